"""Random version-4 UUIDs without a system call each: random bytes are drawn in blocks."""

from __future__ import annotations

import os
import uuid


class IdSource:
    """Hands out UUID4 strings, drawing 4 KiB of randomness from the OS at a time.

    The ids are as unpredictable as ``uuid.uuid4()``'s (both read ``os.urandom``); only
    the number of reads changes. Not shared between threads.
    """

    def __init__(self, block: int = 256) -> None:
        self._block = block
        self._buffer = b""
        self._offset = 0

    def new(self) -> str:
        """A new random UUID, as its canonical string."""
        if self._offset >= len(self._buffer):
            self._buffer = os.urandom(16 * self._block)
            self._offset = 0
        raw = self._buffer[self._offset : self._offset + 16]
        self._offset += 16
        return str(uuid.UUID(bytes=raw, version=4))

    def hex(self) -> str:
        """A new random UUID as 32 hex digits."""
        return self.new().replace("-", "")
