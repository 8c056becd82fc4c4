"""Artifact storage in memory: the shipped fake of the storage seam, for tests.

It keeps what the real storages promise (content addressing, uploads invisible until
committed, nothing left by a discarded one) and records every blob stored, so a test
can see what went through the seam. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TypeVar

from server.media.storage import ArtifactNotFoundError, StoredBlob, check_digest

T = TypeVar("T")


class MemoryArtifactStorage:
    """Blobs in a dict; ``staged`` counts uploads opened and not yet committed or discarded."""

    location = "memory:"

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.mime_types: dict[str, str] = {}
        self.staged = 0
        self.stored: list[str] = []  # every digest put or committed, repeats included

    async def start(self) -> None:
        """Nothing to prepare."""

    async def aclose(self) -> None:
        """Nothing to release."""

    async def put(self, data: bytes, mime_type: str) -> StoredBlob:
        """Keep a copy of ``data``."""
        sha256 = hashlib.sha256(data).hexdigest()
        return self._keep(sha256, bytes(data), mime_type)

    def _keep(self, sha256: str, data: bytes, mime_type: str) -> StoredBlob:
        self.stored.append(sha256)
        if sha256 in self.blobs:
            return StoredBlob(sha256, len(data), existed=True)
        self.blobs[sha256] = data
        self.mime_types[sha256] = mime_type
        return StoredBlob(sha256, len(data))

    def begin_upload(self) -> MemoryUpload:
        """A new upload, held in memory until committed."""
        return MemoryUpload(self)

    async def read(self, sha256: str) -> bytes:
        """The blob."""
        check_digest(sha256)
        try:
            return self.blobs[sha256]
        except KeyError:
            raise ArtifactNotFoundError(sha256) from None

    async def stream(
        self, sha256: str, offset: int, chunk_bytes: int
    ) -> AsyncGenerator[bytes, None]:
        """The blob from ``offset`` on, in slices."""
        data = await self.read(sha256)
        while offset < len(data):
            yield data[offset : offset + chunk_bytes]
            offset += chunk_bytes

    async def size(self, sha256: str) -> int | None:
        """The blob's size, None when it is not stored."""
        check_digest(sha256)
        data = self.blobs.get(sha256)
        return None if data is None else len(data)

    async def sweep(self, *, max_age: float) -> int:
        """Nothing outlives a process here: nothing to sweep."""
        return 0


class MemoryUpload:
    """An upload collected in a buffer."""

    def __init__(self, storage: MemoryArtifactStorage) -> None:
        self._storage = storage
        self._chunks: list[bytes] | None = None
        self._done = False  # committed or discarded
        self._digest = ""
        self._size = 0

    @property
    def size_bytes(self) -> int:
        """Bytes written so far."""
        return self._size

    async def open(self) -> None:
        """Start the buffer (nothing, once discarded)."""
        if self._chunks is None and not self._done:
            self._chunks = []
            self._storage.staged += 1

    async def write(self, chunk: bytes) -> None:
        """Append a chunk.

        Raises:
            ValueError: the upload is not open.
        """
        if self._chunks is None or self._digest:
            raise ValueError("the upload is not open")
        self._chunks.append(bytes(chunk))
        self._size += len(chunk)

    async def finish(self) -> str:
        """The content's SHA-256; no more writes."""
        self._digest = hashlib.sha256(self._content()).hexdigest()
        return self._digest

    async def probe(self, check: Callable[[bytes | Path], T]) -> T:
        """``check(bytes)`` in a thread."""
        return await asyncio.to_thread(check, self._content())

    async def commit(self, mime_type: str) -> StoredBlob:
        """Store the buffer under its digest.

        Raises:
            ValueError: the upload was not finished, or was discarded.
        """
        if self._chunks is None or not self._digest:
            raise ValueError("the upload was discarded or not finished")
        blob = self._storage._keep(self._digest, self._content(), mime_type)
        self._release()
        return blob

    async def discard(self) -> None:
        """Drop the buffer; idempotent."""
        self._release()

    def _content(self) -> bytes:
        if self._chunks is None:
            raise ValueError("the upload is not open")
        return b"".join(self._chunks)

    def _release(self) -> None:
        if self._chunks is not None:
            self._storage.staged -= 1
        self._chunks = None
        self._done = True
