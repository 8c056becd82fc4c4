"""The service with the fake compute backend, in its own process, for tests that crash it.

    python tests/fake_server.py hold|instant

Settings come from ``SARTIQ_*`` variables as for ``python -m server``; the fake either
holds every task (so generations stay live) or completes it at once.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import Settings
from server.logs import configure


async def _serve(hold: bool) -> None:
    settings = Settings()
    configure(settings.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with App(settings, compute=FakeComputeBackend(hold=hold)):
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1:] == ["hold"]))
