"""Pieces the benchmark modules share: server processes, their memory, a sample image."""

from __future__ import annotations

import asyncio
import contextlib
import io
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class ServerProcess:
    """A server started by ``benchmarks.servers`` in its own process."""

    target: str
    pid: int

    def rss_kib(self) -> int:
        """The process's resident memory, in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")


@contextlib.asynccontextmanager
async def server_process(*args: str) -> AsyncIterator[ServerProcess]:
    """Start ``python -m benchmarks.servers ARGS`` and stop it (SIGTERM) afterwards."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.servers", *args, stdout=asyncio.subprocess.PIPE
    )
    if process.stdout is None:
        raise RuntimeError("no stdout pipe")
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    try:
        yield ServerProcess(f"127.0.0.1:{int(line)}", process.pid)
    finally:
        process.terminate()
        await process.wait()


def png() -> bytes:
    """A small PNG to use as a catalog reference image."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 40)).save(buffer, format="PNG")
    return buffer.getvalue()
