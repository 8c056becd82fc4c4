"""Content-addressed artifact storage on the local filesystem."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from server.domain.model import Artifact, artifact_name
from server.domain.recorder import utcnow
from server.media.images import ImageInfo

_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "video/mp4": ".mp4",
}


_TEMP = ".tmp-"


def _temp_prefix() -> str:
    """Temporary files name their writer: ``.tmp-<host>-<pid>-``."""
    return f"{_TEMP}{socket.gethostname()}-{os.getpid()}-"


def _writer_is_alive(name: str) -> bool:
    """Whether the writer a temporary file names may still be writing it."""
    try:
        host, pid, _ = name.removeprefix(_TEMP).rsplit("-", 2)
        pid_number = int(pid)
    except ValueError:
        return False  # not ours, or from a release that did not name the writer
    if host != socket.gethostname():
        return True  # another host's process: only its age can tell
    if pid_number == os.getpid():
        return True
    try:
        os.kill(pid_number, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """Where a blob landed; ``existed`` when the same bytes were stored already."""

    sha256: str
    size_bytes: int
    path: Path
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


class FileArtifactStore:
    """Stores blobs under ``root/ab/<sha256><ext>``; writing the same bytes twice is free."""

    def __init__(self, root: Path) -> None:
        self._root = root.resolve()

    @property
    def root(self) -> Path:
        """The directory holding every blob."""
        return self._root

    def path_for(self, sha256: str, mime_type: str) -> Path:
        """The file that holds (or will hold) the blob ``sha256``."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self._root / sha256[:2] / f"{sha256}{_EXTENSIONS.get(mime_type, '.bin')}"

    def put_sync(self, data: bytes, mime_type: str) -> StoredBlob:
        """Write ``data`` atomically (temp file, fsync, rename) unless already present."""
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.path_for(sha256, mime_type)
        if path.exists():
            return StoredBlob(sha256, len(data), path, existed=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix())
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredBlob(sha256, len(data), path)

    def sweep_temporary(self, *, max_age: float) -> int:
        """Remove temporary files that no write will ever finish; returns how many.

        A temporary file is stale when the process that wrote it, on this host, is gone
        (it was killed between writing and renaming), or when it is older than
        ``max_age`` seconds (its writer may be another host sharing the directory).
        """
        removed = 0
        now = time.time()
        for tmp in self._root.glob(f"*/{_TEMP}*"):
            if _writer_is_alive(tmp.name) and now - _mtime(tmp) < max_age:
                continue
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed

    def begin_upload(self) -> Upload:
        """A new blob to be written chunk by chunk, hashed as it goes.

        Touches no file: ``Upload.open`` creates its temporary file.
        """
        return Upload(self, self._root / "incoming")

    def read_chunk(self, sha256: str, mime_type: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of a stored blob from ``offset``.

        Raises:
            FileNotFoundError: nothing is stored under that digest.
        """
        with self.path_for(sha256, mime_type).open("rb") as handle:
            handle.seek(offset)
            return handle.read(size)

    def _adopt(self, tmp: Path, sha256: str, size: int, mime_type: str) -> StoredBlob:
        """Move a finished temporary file into place, or drop it if the blob exists."""
        path = self.path_for(sha256, mime_type)
        if path.exists():
            tmp.unlink(missing_ok=True)
            return StoredBlob(sha256, size, path, existed=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, path)
        return StoredBlob(sha256, size, path)

    async def put(self, data: bytes, mime_type: str) -> StoredBlob:
        """Write ``data`` off the event loop."""
        return await asyncio.to_thread(self.put_sync, data, mime_type)

    def read_sync(self, sha256: str, mime_type: str) -> bytes:
        """The bytes of a stored blob.

        Raises:
            FileNotFoundError: nothing is stored under that digest.
        """
        return self.path_for(sha256, mime_type).read_bytes()

    def find_sync(self, sha256: str) -> Path:
        """The file holding ``sha256``, whatever its extension.

        Raises:
            FileNotFoundError: nothing is stored under that digest.
        """
        for ext in (*_EXTENSIONS.values(), ".bin"):
            path = self.path_for(sha256, "").with_suffix(ext)
            if path.exists():
                return path
        raise FileNotFoundError(f"no artifact {sha256}")


class Upload:
    """A blob being written: chunks go to a temporary file while the sha256 is computed.

    Call ``open``, ``write`` for each chunk, then ``close``; then ``commit`` the blob
    under its digest or ``discard`` it. ``discard`` may come at any moment, even while
    another thread is still opening or writing (a caller cancelled mid-call cannot wait
    for its thread): a lock orders them, and nothing is created once discarded, so no
    temporary file or descriptor outlives the upload. Blocking methods: run them off
    the event loop.
    """

    def __init__(self, store: FileArtifactStore, directory: Path) -> None:
        self._store = store
        self._directory = directory
        self._lock = threading.Lock()
        self._handle: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._discarded = False
        self._path: Path | None = None
        self.size_bytes = 0

    @property
    def path(self) -> Path:
        """The temporary file holding what was written so far.

        Raises:
            ValueError: there is none (not opened, committed or discarded).
        """
        if self._path is None:
            raise ValueError("the upload has no temporary file")
        return self._path

    def open(self) -> None:
        """Create the temporary file (nothing, once discarded).

        Raises:
            OSError: the file cannot be created.
        """
        with self._lock:
            if self._discarded or self._path is not None:
                return
            self._directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._directory, prefix=_temp_prefix())
            self._path = Path(tmp)
            try:
                self._handle = os.fdopen(fd, "wb")
            except BaseException:
                os.close(fd)
                raise

    def write(self, chunk: bytes) -> None:
        """Append a chunk.

        Raises:
            ValueError: the upload is not open (or was discarded meanwhile).
        """
        with self._lock:
            handle = self._open_handle()
            handle.write(chunk)
            self._hash.update(chunk)
            self.size_bytes += len(chunk)

    def close(self) -> str:
        """Flush to disk and return the content's sha256; the descriptor is closed."""
        with self._lock:
            handle = self._open_handle()
            try:
                handle.flush()
                os.fsync(handle.fileno())
            finally:
                handle.close()
            return self._hash.hexdigest()

    def commit(self, mime_type: str) -> StoredBlob:
        """Store the closed upload under its digest.

        Raises:
            ValueError: the upload was never opened, or was discarded.
        """
        with self._lock:
            if self._discarded or self._path is None:
                raise ValueError("the upload was discarded")
            blob = self._store._adopt(
                self._path, self._hash.hexdigest(), self.size_bytes, mime_type
            )
            self._path = None  # it is the blob now, or gone: nothing left to discard
            return blob

    def discard(self) -> None:
        """Drop the upload: close its file and remove it. Idempotent; never raises."""
        with self._lock:
            self._discarded = True
            if self._handle is not None:
                with contextlib.suppress(OSError):
                    self._handle.close()
            if self._path is not None:
                with contextlib.suppress(OSError):
                    self._path.unlink(missing_ok=True)
                self._path = None

    def _open_handle(self) -> BinaryIO:
        if self._handle is None or self._handle.closed or self._discarded:
            raise ValueError("the upload is not open")
        return self._handle
