"""Uploading and downloading artifacts, scoped to the caller's organization."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

from server.config import MediaSettings
from server.domain import model
from server.domain.errors import (
    ArtifactStorageUnavailableError,
    InvalidArgumentError,
    NotFoundError,
    Violations,
)
from server.media.images import ImageInfo, InvalidImageError, probe_image
from server.media.storage import ArtifactStorage, StagedUpload, StorageUnavailableError
from server.store import mapping, repository, rows
from server.store.sessions import Store
from server.store.writer import Writer

log = logging.getLogger(__name__)
CHUNK_BYTES = 1024 * 1024
SHA256_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class UploadHeader:
    """What an upload announced before its bytes: size and digest, 0/"" when unknown."""

    size_bytes: int = 0
    sha256: str = ""


class ArtifactService:
    """Content-addressed artifacts: bytes are shared, visibility is per organization."""

    def __init__(
        self, store: Store, writer: Writer, files: ArtifactStorage, *, media: MediaSettings
    ) -> None:
        self._store = store
        self._writer = writer
        self._files = files
        self._media = media

    async def upload(
        self, org: str, header: UploadHeader, chunks: AsyncIterator[bytes]
    ) -> model.Artifact:
        """Store an uploaded image and make ``org`` its owner.

        Raises:
            InvalidArgumentError: bad header, chunk, size, digest or content.
            ArtifactStorageUnavailableError: the storage cannot take it now.
        """
        limit = self._media.max_upload_bytes
        v = Violations()
        if not 0 <= header.size_bytes <= limit:
            v.add("header.size_bytes", f"must be between 0 and {limit}")
        if header.sha256 and not SHA256_RE.fullmatch(header.sha256):
            v.add("header.sha256", "must be 64 lowercase hex digits")
        v.raise_if_any()
        upload = self._files.begin_upload()
        try:
            # Opened inside the guarded block: a cancel at any await below, this one
            # included, still removes what the upload left (file, descriptor, parts).
            await upload.open()
            info = await self._receive_image(upload, header, chunks, limit)
            blob = await upload.commit(info.mime_type)
        except StorageUnavailableError as exc:
            log.warning("upload not stored: %s", exc)
            raise ArtifactStorageUnavailableError() from None
        finally:
            # After a commit there is nothing left to remove; discard is then a no-op.
            await upload.discard()
        artifact = blob.image_artifact(info)
        await self._writer.write(rows.upload_ops(org, artifact))
        return await self.get(org, blob.sha256)  # as this organization first held it

    async def _receive_image(
        self, upload: StagedUpload, header: UploadHeader, chunks: AsyncIterator[bytes], limit: int
    ) -> ImageInfo:
        """Receive every chunk, check them against the header, and probe the image."""
        digest = await self._receive(upload, chunks, limit)
        if header.size_bytes and header.size_bytes != upload.size_bytes:
            raise InvalidArgumentError.of(
                "header.size_bytes",
                f"announced {header.size_bytes} bytes but {upload.size_bytes} arrived",
            )
        if header.sha256 and header.sha256 != digest:
            raise InvalidArgumentError.of("header.sha256", "does not match the content received")
        max_pixels = self._media.max_input_pixels
        try:
            return await upload.probe(
                lambda content: probe_image(content, max_bytes=limit, max_pixels=max_pixels)
            )
        except InvalidImageError as exc:
            raise InvalidArgumentError.of("content", str(exc)) from None

    @staticmethod
    async def _receive(upload: StagedUpload, chunks: AsyncIterator[bytes], limit: int) -> str:
        async for chunk in chunks:
            if not 1 <= len(chunk) <= CHUNK_BYTES:
                raise InvalidArgumentError.of(
                    "chunk", f"must be 1 to {CHUNK_BYTES} bytes, got {len(chunk)}"
                )
            if upload.size_bytes + len(chunk) > limit:
                raise InvalidArgumentError.of("content", f"must be at most {limit} bytes")
            await upload.write(chunk)
        if not upload.size_bytes:
            raise InvalidArgumentError.of("content", "is empty")
        return await upload.finish()

    async def get(self, org: str, sha256: str) -> model.Artifact:
        """An artifact ``org`` owns, with ``org``'s recipe for it.

        Raises:
            NotFoundError: unknown digest, or one ``org`` does not own.
        """
        if SHA256_RE.fullmatch(sha256):
            async with self._store.read() as session:
                owned = await repository.get_owned_artifact(session, org, sha256)
            if owned is not None:
                return mapping.artifact(*owned)
        raise NotFoundError.of("artifact", {"sha256": sha256})

    async def download(
        self, org: str, sha256: str, offset: int
    ) -> tuple[model.Artifact, AsyncGenerator[tuple[int, bytes], None]]:
        """The artifact and its bytes from ``offset``, as (offset, chunk) pairs.

        Raises:
            NotFoundError: unknown digest, or one ``org`` does not own.
            InvalidArgumentError: ``offset`` is negative or beyond the end.
        """
        artifact = await self.get(org, sha256)
        if not 0 <= offset <= artifact.size_bytes:
            raise InvalidArgumentError.of("offset", f"must be between 0 and {artifact.size_bytes}")
        return artifact, self._chunks(artifact, offset)

    async def _chunks(
        self, artifact: model.Artifact, offset: int
    ) -> AsyncGenerator[tuple[int, bytes], None]:
        """The stored bytes from ``offset`` up to the recorded size, from any replica."""
        if offset >= artifact.size_bytes:
            return
        # Closed as soon as the download ends or is cut: its file or connection goes now.
        async with contextlib.aclosing(
            self._files.stream(artifact.sha256, offset, CHUNK_BYTES)
        ) as chunks:
            try:
                async for chunk in chunks:
                    chunk = chunk[: artifact.size_bytes - offset]  # never past the recorded end
                    if not chunk:
                        return
                    yield offset, chunk
                    offset += len(chunk)
            except StorageUnavailableError as exc:
                log.warning("download of %s cut at %d: %s", artifact.sha256, offset, exc)
                # The caller resumes from the offset it reached.
                raise ArtifactStorageUnavailableError() from None
