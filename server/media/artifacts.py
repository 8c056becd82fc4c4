"""Artifact storage in a local directory: the default, for one node (or a shared volume).

Blobs live under ``root/ab/<sha256><ext>``, written atomically (temporary file, fsync,
rename); uploads are received under ``root/incoming`` and renamed into place when
committed. Every blocking call runs in a thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path

from server.domain.errors import StartupError
from server.media.spool import TEMP, SpooledUpload, SpoolFile, sweep_temp_files, temp_prefix
from server.media.storage import (
    ArtifactCorruptError,
    ArtifactNotFoundError,
    StoredBlob,
    check_digest,
)

_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "video/mp4": ".mp4",
}


class FileArtifactStore:
    """Stores blobs under ``root/ab/<sha256><ext>``; writing the same bytes twice is free."""

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    @property
    def root(self) -> Path:
        """The directory holding every blob."""
        return self._root

    @property
    def location(self) -> str:
        """The directory as a ``file://`` URI."""
        return self._root.as_uri()

    async def start(self) -> None:
        """Create the directory; a start fails here when it cannot be written.

        Raises:
            StartupError: the directory cannot be created.
        """
        try:
            await asyncio.to_thread(self._root.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"cannot create the artifact directory {self._root}: {exc}"
            ) from None

    async def aclose(self) -> None:
        """Nothing to release."""

    def path_for(self, sha256: str, mime_type: str) -> Path:
        """The file that holds (or will hold) the blob ``sha256``."""
        check_digest(sha256)
        return self._root / sha256[:2] / f"{sha256}{_EXTENSIONS.get(mime_type, '.bin')}"

    def put_sync(self, data: bytes, mime_type: str) -> StoredBlob:
        """Write ``data`` atomically (temp file, fsync, rename) unless already present."""
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.path_for(sha256, mime_type)
        if path.exists():
            return StoredBlob(sha256, len(data), existed=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix())
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredBlob(sha256, len(data))

    async def put(self, data: bytes, mime_type: str) -> StoredBlob:
        """Write ``data`` off the event loop."""
        return await asyncio.to_thread(self.put_sync, data, mime_type)

    def sweep_temporary(self, *, max_age: float) -> int:
        """Remove temporary files that no write will ever finish; returns how many.

        See ``spool.sweep_temp_files``: those of a dead writer on this host, and those
        older than ``max_age`` seconds.
        """
        return sweep_temp_files(self._root, f"*/{TEMP}*", max_age=max_age)

    async def sweep(self, *, max_age: float) -> int:
        """``sweep_temporary`` off the event loop."""
        return await asyncio.to_thread(self.sweep_temporary, max_age=max_age)

    def spool(self) -> SpoolFile:
        """The temporary file an upload is received into (created by its ``open``)."""
        return SpoolFile(self._root / "incoming")

    def begin_upload(self) -> LocalUpload:
        """A new blob to be written chunk by chunk, hashed as it goes; touches no file."""
        return LocalUpload(self, self.spool())

    def adopt(self, tmp: Path, sha256: str, size: int, mime_type: str) -> StoredBlob:
        """Move a finished temporary file into place, or drop it if the blob exists."""
        path = self.path_for(sha256, mime_type)
        if path.exists():
            tmp.unlink(missing_ok=True)
            return StoredBlob(sha256, size, existed=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
        return StoredBlob(sha256, size)

    def find_sync(self, sha256: str) -> Path:
        """The file holding ``sha256``, whatever its extension.

        Raises:
            ArtifactNotFoundError: nothing is stored under that digest.
        """
        for ext in (*_EXTENSIONS.values(), ".bin"):
            path = self.path_for(sha256, "").with_suffix(ext)
            if path.exists():
                return path
        raise ArtifactNotFoundError(sha256)

    def read_sync(self, sha256: str) -> bytes:
        """The bytes of a stored blob, checked against its digest.

        Raises:
            ArtifactNotFoundError: nothing is stored under that digest.
            ArtifactCorruptError: the file no longer holds those bytes.
        """
        data = self.find_sync(sha256).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ArtifactCorruptError(sha256)
        return data

    async def read(self, sha256: str) -> bytes:
        """``read_sync`` off the event loop."""
        return await asyncio.to_thread(self.read_sync, sha256)

    async def size(self, sha256: str) -> int | None:
        """The blob's size, None when it is not stored."""
        try:
            path = await asyncio.to_thread(self.find_sync, sha256)
            return (await asyncio.to_thread(path.stat)).st_size
        except FileNotFoundError:
            return None

    async def stream(
        self, sha256: str, offset: int, chunk_bytes: int
    ) -> AsyncGenerator[bytes, None]:
        """The blob from ``offset`` on, one chunk read per thread hop."""
        path = await asyncio.to_thread(self.find_sync, sha256)
        while True:
            chunk = await asyncio.to_thread(_read_at, path, offset, chunk_bytes)
            if not chunk:
                return
            yield chunk
            offset += len(chunk)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


class LocalUpload(SpooledUpload):
    """An upload received under ``root/incoming`` and renamed into place on commit."""

    def __init__(self, store: FileArtifactStore, spool: SpoolFile) -> None:
        super().__init__(spool)
        self._store = store

    async def commit(self, mime_type: str) -> StoredBlob:
        """Rename the received file into place (or drop it: the blob is there already).

        Raises:
            ValueError: the upload was never opened, or was discarded.
        """

        def adopt(tmp: Path, sha256: str, size: int) -> StoredBlob:
            return self._store.adopt(tmp, sha256, size, mime_type)

        return await asyncio.to_thread(self._spool.take, adopt)
