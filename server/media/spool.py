"""Temporary files that receive a blob before it is stored, and the sweep of stale ones.

A temporary file names its writer (``.tmp-<host>-<pid>-...``), so a sweep can tell the
files of a killed process from those of one still writing. ``SpooledUpload`` is the
``StagedUpload`` of every storage that receives into such a file: the local directory
moves it into place, object storage sends it on.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

from server.media.storage import StoredBlob

T = TypeVar("T")
TEMP = ".tmp-"


def temp_prefix() -> str:
    """Temporary files name their writer: ``.tmp-<host>-<pid>-``."""
    return f"{TEMP}{socket.gethostname()}-{os.getpid()}-"


def _writer_is_alive(name: str) -> bool:
    """Whether the writer a temporary file names may still be writing it."""
    try:
        host, pid, _ = name.removeprefix(TEMP).rsplit("-", 2)
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


def sweep_temp_files(root: Path, pattern: str, *, max_age: float) -> int:
    """Remove the temporary files under ``root`` matching ``pattern`` that no writer will finish.

    A file is stale when the process that wrote it, on this host, is gone (killed between
    writing and storing), or when it is older than ``max_age`` seconds (its writer may be
    another host sharing the directory). Returns how many were removed.
    """
    removed = 0
    now = time.time()
    for tmp in root.glob(pattern):
        if _writer_is_alive(tmp.name) and now - _mtime(tmp) < max_age:
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


class SpoolFile:
    """A temporary file receiving a blob, hashed as it is written. Blocking: use threads.

    ``discard`` may come at any moment, even while another thread is still opening or
    writing (a caller cancelled mid-call cannot wait for its thread): a lock orders them,
    and nothing is created once discarded, so no file or descriptor outlives the spool.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._lock = threading.Lock()
        self._handle: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._discarded = False
        self._path: Path | None = None
        self.size_bytes = 0

    @property
    def path(self) -> Path:
        """The file holding what was written so far.

        Raises:
            ValueError: there is none (not opened, taken or discarded).
        """
        if self._discarded:
            raise ValueError("the upload was discarded")
        if self._path is None:
            raise ValueError("the upload has no temporary file")
        return self._path

    def open(self) -> None:
        """Create the file (nothing, once discarded).

        Raises:
            OSError: the file cannot be created.
        """
        with self._lock:
            if self._discarded or self._path is not None:
                return
            self._directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._directory, prefix=temp_prefix())
            self._path = Path(tmp)
            try:
                self._handle = os.fdopen(fd, "wb")
            except BaseException:
                os.close(fd)
                raise

    def write(self, chunk: bytes) -> None:
        """Append a chunk.

        Raises:
            ValueError: the file is not open (or was discarded meanwhile).
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

    def take(self, adopt: Callable[[Path, str, int], T]) -> T:
        """``adopt(file, sha256, size)``: the file is the caller's from then on.

        Raises:
            ValueError: the spool was never opened, or was discarded.
        """
        with self._lock:
            if self._discarded or self._path is None:
                raise ValueError("the upload was discarded")
            taken = adopt(self._path, self._hash.hexdigest(), self.size_bytes)
            self._path = None  # it is the caller's now, or gone: nothing left to discard
            return taken

    def discard(self) -> None:
        """Close the file and remove it. Idempotent; never raises."""
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


class SpooledUpload(abc.ABC):
    """A ``StagedUpload`` received into a ``SpoolFile``; subclasses say how it is stored."""

    def __init__(self, spool: SpoolFile) -> None:
        self._spool = spool
        self._digest = ""

    @property
    def size_bytes(self) -> int:
        """Bytes written so far."""
        return self._spool.size_bytes

    async def open(self) -> None:
        """Create the temporary file off the event loop."""
        await asyncio.to_thread(self._spool.open)

    async def write(self, chunk: bytes) -> None:
        """Append a chunk off the event loop."""
        await asyncio.to_thread(self._spool.write, chunk)

    async def finish(self) -> str:
        """Flush and close the file; the content's SHA-256."""
        self._digest = await asyncio.to_thread(self._spool.close)
        return self._digest

    async def probe(self, check: Callable[[bytes | Path], T]) -> T:
        """``check(file)`` in a thread, on what was received."""
        return await asyncio.to_thread(check, self._spool.path)

    @abc.abstractmethod
    async def commit(self, mime_type: str) -> StoredBlob:
        """Store the finished upload under its digest."""

    async def discard(self) -> None:
        """Remove the temporary file; idempotent, never raises."""
        await asyncio.to_thread(self._spool.discard)
