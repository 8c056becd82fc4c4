"""One server process per SQLite file: an exclusive lock on a file beside the database."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from server.domain.errors import StartupError


class DatabaseLock:
    """An exclusive ``flock`` on ``<database>.lock``, held until ``release`` or the process ends.

    SQLite has one writer per file, and the service's leases assume that any other holder
    of a lease on an SQLite file is a dead predecessor: a second server process on the same
    file would take over the first one's live generations. The lock makes the second one
    refuse to start instead. It dies with its process (a crash or ``kill -9`` leaves no
    stale lock), and the file itself stays: removing it would let two processes lock two
    different files of the same name.
    """

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def acquire(cls, database: str) -> DatabaseLock:
        """Lock the SQLite file ``database`` for this process.

        Raises:
            StartupError: another server process (or server in this process) holds it, or
                the file cannot be locked at all.
        """
        path = Path(f"{database}.lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError(f"cannot open the lock file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StartupError(
                f"another server process{holder} is using the SQLite database {database} "
                f"(it holds {path}): SQLite serves one process per database file; stop "
                "that one, or use PostgreSQL (SARTIQ_DATABASE__URL=postgresql+asyncpg://...) "
                "for several replicas"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StartupError(f"cannot lock {path}: {exc.strerror}") from None
        # Who holds it, for the message of the next one that tries; a hint, never trusted.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        """Unlock; idempotent, never raises."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _holder(fd: int) -> str:
    """`` (pid N)`` from the lock file, or nothing when it does not say."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""
