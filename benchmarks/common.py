"""Pieces the benchmark modules share: server processes, their memory, a sample image."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass
class ServerProcess:
    """A server started by ``benchmarks.servers`` in its own process."""

    target: str
    process: asyncio.subprocess.Process

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    async def stop(self) -> dict[str, float] | None:
        """SIGTERM the server, wait for it, and return the store statistics it printed."""
        if self.process.returncode is None:
            self.process.terminate()
        out = b""
        if self.process.stdout is not None:
            out = await self.process.stdout.read()
        await self.process.wait()
        line = out.decode().strip()
        return json.loads(line) if line else None

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
    server = ServerProcess(f"127.0.0.1:{int(line)}", process)
    try:
        yield server
    finally:
        await server.stop()


def png() -> bytes:
    """A small PNG to use as a catalog reference image."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 40)).save(buffer, format="PNG")
    return buffer.getvalue()
