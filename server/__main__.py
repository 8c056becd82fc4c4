"""Entry point: ``python -m server`` (or ``sartiq-server``) serves until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import signal

from server.app import App
from server.config import Settings
from server.logs import configure


async def serve(settings: Settings) -> None:
    """Run the app until a termination signal, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with App(settings):
        await stop.wait()


def main() -> None:
    """Parse the settings once and serve."""
    settings = Settings()
    configure(settings.log_level)
    settings.media.artifact_dir.mkdir(parents=True, exist_ok=True)
    if settings.database.url.startswith("sqlite"):
        path = settings.database.url.split("///", 1)[-1]
        if path and path != ":memory:":
            from pathlib import Path

            Path(path).parent.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
