"""Entry point: ``python -m server`` (or ``sartiq-server``) serves until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from server.app import App
from server.config import Settings
from server.domain.errors import StartupError
from server.logs import configure


async def serve(settings: Settings) -> None:
    """Run the app until a termination signal, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with App(settings) as app:
        loop.add_signal_handler(signal.SIGHUP, app.reload_tls)
        await stop.wait()


def main() -> None:
    """Parse the settings once and serve."""
    settings = Settings()
    configure(settings.log_level)
    if os.environ.get("SARTIQ_GRPC_CORE_DEBUG") == "1":
        logging.getLogger("server").warning(
            "SARTIQ_GRPC_CORE_DEBUG=1: gRPC core tracing (GRPC_TRACE) is on, and it writes "
            "call metadata, credentials included, to stderr"
        )
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        logging.getLogger("server").error("cannot start: %s", exc)
        print(f"sartiq-server: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
