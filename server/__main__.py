"""Entry point: ``python -m server`` (or ``sartiq-server``) serves until SIGTERM or SIGINT.

With ``SARTIQ_SERVER__WORKERS`` above 1 this process supervises that many worker
processes on one port instead (``server/supervisor.py``); each worker runs this same
entry point with its index set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from server.config import Settings
from server.domain.errors import StartupError
from server.logs import configure
from server.supervisor import SERVING, Supervisor

if TYPE_CHECKING:
    from server.app import App

# A worker's stdin: its supervisor's socket (``server/supervisor.py``).
_SUPERVISOR_FD = 0


async def serve(settings: Settings, make_app: Callable[[Settings], App]) -> None:
    """Run the app until a termination signal (or, for a worker, its supervisor's end)."""
    from server.app import freeze_heap

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    supervised = settings.server.worker_index is not None and _stop_with_supervisor(loop, stop)
    try:
        async with make_app(settings) as app:
            freeze_heap()
            loop.add_signal_handler(signal.SIGHUP, app.reload_tls)
            if supervised:
                _tell_supervisor(SERVING)
            await stop.wait()
    finally:
        if supervised:
            loop.remove_reader(_SUPERVISOR_FD)


def _stop_with_supervisor(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> bool:
    """Set ``stop`` when the supervisor's socket (stdin) ends; whether stdin is one.

    It ends when the supervisor exits in any way, SIGKILL included, so a worker never
    serves on without it.
    """
    mode = os.fstat(_SUPERVISOR_FD).st_mode
    if not (stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)):
        return False

    def readable() -> None:
        try:
            data = os.read(_SUPERVISOR_FD, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(_SUPERVISOR_FD)
            stop.set()

    loop.add_reader(_SUPERVISOR_FD, readable)
    return True


def _tell_supervisor(message: bytes) -> None:
    """Write a few bytes to the supervisor; a supervisor already gone is not an error."""
    with contextlib.suppress(OSError):
        os.write(_SUPERVISOR_FD, message)


def run(make_app: Callable[[Settings], App], argv: Sequence[str]) -> None:
    """Parse the settings once and serve: in this process, or as the supervisor of workers.

    Args:
        make_app: builds the app of this process from the settings.
        argv: the command line that starts one worker (this program's own).
    """
    settings = Settings()
    s = settings.server
    # Workers share the supervisor's stderr: each line says which one wrote it.
    fields = {} if s.worker_index is None else {"worker": s.worker_index, "pid": os.getpid()}
    configure(settings.log_level, fields)
    if os.environ.get("SARTIQ_GRPC_CORE_DEBUG") == "1":
        logging.getLogger("server").warning(
            "SARTIQ_GRPC_CORE_DEBUG=1: gRPC core tracing (GRPC_TRACE) is on, and it writes "
            "call metadata, credentials included, to stderr"
        )
    status = 0
    try:
        if s.workers > 1 and s.worker_index is None:
            status = asyncio.run(Supervisor(settings, argv).run())
        else:
            asyncio.run(serve(settings, make_app))
    except StartupError as exc:
        logging.getLogger("server").error("cannot start: %s", exc)
        print(f"sartiq-server: cannot start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if status:
        raise SystemExit(status)


def _app(settings: Settings) -> App:
    # Imported here: a supervisor never loads gRPC or the service, only its workers do.
    from server.app import App

    return App(settings)


def main() -> None:
    """Serve with the configured compute backend."""
    run(_app, [sys.executable, "-m", "server"])


if __name__ == "__main__":
    main()
