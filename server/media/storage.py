"""The artifact storage seam: where artifact bytes live, whatever holds them.

Every writer and reader of artifact bytes goes through an ``ArtifactStorage``: uploads,
compute outputs, fetched inputs, catalog images, downloads, the compute backends'
``artifact:`` inputs and the evaluator. Blobs are content-addressed (named by their
SHA-256) and immutable. Implementations: a local directory (``artifacts``, the default),
S3-compatible object storage (``s3``) and an in-memory one for tests (``memory``); one
behavioural suite (``tests/media/test_storage_contract.py``) runs against each.

A staged upload is invisible until ``commit``: a discarded, failed or cancelled one
leaves no blob behind (no file on disk, no object and no open multipart upload).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from server.domain.model import Artifact, artifact_name
from server.domain.recorder import utcnow
from server.media.images import ImageInfo

T = TypeVar("T")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
_ARTIFACT_URI = re.compile(r"artifact:([0-9a-f]{64})")


class ArtifactNotFoundError(FileNotFoundError):
    """Nothing is stored under that digest."""

    def __init__(self, sha256: str) -> None:
        super().__init__(f"no artifact {sha256}")
        self.sha256 = sha256


class StorageError(OSError):
    """The storage refused or failed a call; the message names its code, never a credential."""


class StorageUnavailableError(StorageError):
    """The storage cannot be reached, or is overloaded, for now: retrying may help."""


class ArtifactCorruptError(OSError):
    """What is stored under a digest does not hash to it."""

    def __init__(self, sha256: str) -> None:
        super().__init__(f"artifact {sha256} does not match its digest")
        self.sha256 = sha256


def check_digest(sha256: str) -> str:
    """``sha256`` when it is 64 lowercase hex digits.

    Raises:
        ValueError: it is not.
    """
    if SHA256_RE.fullmatch(sha256) is None:
        raise ValueError("not a sha256 hex digest")
    return sha256


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """Where a blob landed; ``existed`` when the same bytes were stored already."""

    sha256: str
    size_bytes: int
    existed: bool = False

    @property
    def uri(self) -> str:
        """The blob's resource name, never where the server keeps it."""
        return artifact_name(self.sha256)

    def image_artifact(self, info: ImageInfo) -> Artifact:
        """The artifact record of this blob holding the probed image ``info``."""
        return Artifact(
            sha256=self.sha256,
            mime_type=info.mime_type,
            size_bytes=self.size_bytes,
            width=info.width,
            height=info.height,
            uri=self.uri,
            created_at=utcnow(),
        )


class StagedUpload(Protocol):
    """A blob received chunk by chunk, hashed as it goes, visible only once committed.

    ``open``, ``write`` each chunk, ``finish``; then ``commit`` it under its digest.
    ``discard`` may come at any moment (a cancelled caller calls it from ``finally``):
    it is idempotent, never raises, and leaves nothing of the upload behind.
    """

    @property
    def size_bytes(self) -> int:
        """Bytes written so far."""
        ...

    async def open(self) -> None:
        """Make room for the upload (nothing, once discarded)."""

    async def write(self, chunk: bytes) -> None:
        """Append a chunk."""

    async def finish(self) -> str:
        """Stop writing; the content's SHA-256."""
        ...

    async def probe(self, check: Callable[[bytes | Path], T]) -> T:
        """``check(content)`` off the event loop, on what was written (after ``finish``)."""
        ...

    async def commit(self, mime_type: str) -> StoredBlob:
        """Store the finished upload under its digest: from now on it is readable."""
        ...

    async def discard(self) -> None:
        """Drop the upload and whatever it left; idempotent, never raises."""


class ArtifactStorage(Protocol):
    """Content-addressed, immutable blobs. Nothing here blocks the event loop."""

    @property
    def location(self) -> str:
        """Where the blobs live, for logs (``file:///...``, ``s3://bucket/prefix``)."""
        ...

    async def start(self) -> None:
        """Check that the storage can be used (and create what it needs).

        Raises:
            StartupError: it cannot, and the message says why.
        """

    async def put(self, data: bytes, mime_type: str) -> StoredBlob:
        """Store ``data`` unless the same bytes are stored already."""
        ...

    def begin_upload(self) -> StagedUpload:
        """A new upload; touches nothing until its ``open``."""
        ...

    async def read(self, sha256: str) -> bytes:
        """The whole blob, checked against its digest.

        Raises:
            ArtifactNotFoundError: nothing is stored under ``sha256``.
        """
        ...

    def stream(self, sha256: str, offset: int, chunk_bytes: int) -> AsyncGenerator[bytes, None]:
        """The blob from ``offset`` on, in chunks of ``chunk_bytes`` (the last may be shorter).

        Raises:
            ArtifactNotFoundError: nothing is stored under ``sha256`` (at the first chunk).
        """
        ...

    async def size(self, sha256: str) -> int | None:
        """The blob's size in bytes, None when nothing is stored under ``sha256``."""
        ...

    async def sweep(self, *, max_age: float) -> int:
        """Remove what unfinished uploads left behind (their writers are gone); how many."""
        ...

    async def aclose(self) -> None:
        """Release connections and threads; idempotent."""


@runtime_checkable
class ReadsBlocking(Protocol):
    """A storage that can also read a blob in the calling thread (no event loop needed)."""

    def read_sync(self, sha256: str) -> bytes:
        """``read``, blocking: the whole blob, checked against its digest.

        Raises:
            ArtifactNotFoundError: nothing is stored under ``sha256``.
        """
        ...


def blocking_reader(
    storage: ArtifactStorage, loop: asyncio.AbstractEventLoop
) -> Callable[[str], bytes]:
    """``artifact:<sha256>`` inputs read for a compute backend, from its worker threads.

    A storage that reads blocking (``ReadsBlocking``: files on a local disk) is read in
    the calling thread. Otherwise the read runs on ``loop`` (the storage is async) and the
    calling thread waits: called on the loop itself that would wait forever, so it refuses.
    """
    read_sync = storage.read_sync if isinstance(storage, ReadsBlocking) else None

    def resolve(uri: str) -> bytes:
        match = _ARTIFACT_URI.fullmatch(uri)
        if match is None:
            raise FileNotFoundError(f"cannot resolve {uri!r}")
        if _running_loop() is loop:
            raise RuntimeError("an artifact is read off the event loop, never on it")
        if read_sync is not None:
            return read_sync(match.group(1))
        return asyncio.run_coroutine_threadsafe(storage.read(match.group(1)), loop).result()

    return resolve


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
