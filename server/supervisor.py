"""Several worker processes of the service on one port, started and kept up by a supervisor.

With ``SARTIQ_SERVER__WORKERS=N`` (N > 1) ``python -m server`` supervises instead of
serving: it reserves the port (a free one for port 0), starts N copies of its own command
line, each a full replica with its own engine and writer listening on that port with
``SO_REUSEPORT`` (the kernel spreads new connections over them), and gives each its
index in ``SARTIQ_SERVER__WORKER_INDEX``. Once all serve it writes the port file. It
forwards SIGTERM/SIGINT to the workers and waits for their graceful shutdown, restarts a
worker that dies (``SARTIQ_SERVER__WORKER_RESTARTS`` per minute at most, then it stops
everything with status 1), and exits with status 2 when a worker cannot start (a bad
setting, a port in use: the worker says why on the shared stderr).

Workers are new processes (fork and exec), never forks of a process that loaded gRPC
(see ``server/__init__.py``); the supervisor itself never loads the service. Each
worker's stdin is a pipe from the supervisor: when the supervisor dies, even by SIGKILL,
the pipe ends and the workers shut down instead of serving on as orphans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from server.config import Settings
from server.domain.errors import StartupError
from server.store.db import is_sqlite

log = logging.getLogger(__name__)

# How often the supervisor looks for the workers' "serving" files while they start.
_POLL_S = 0.05
# Seconds a worker may take beyond the grace period to stop before it is killed.
_STOP_MARGIN_S = 30.0
_RESTART_WINDOW_S = 60.0


def check_workers(settings: Settings) -> None:
    """Refuse several workers on SQLite.

    Raises:
        StartupError: more than one worker is asked for on an SQLite database.
    """
    workers = settings.server.workers
    if workers > 1 and is_sqlite(settings.database.url):
        raise StartupError(
            f"SARTIQ_SERVER__WORKERS={workers} needs PostgreSQL: SQLite serves one process per "
            "database file; set SARTIQ_SERVER__WORKERS=1, or "
            "SARTIQ_DATABASE__URL=postgresql+asyncpg://... for several workers"
        )


def reserve_port(host: str, port: int) -> tuple[int, socket.socket | None]:
    """The port the workers will share, and a socket that holds it until they listen.

    Port 0 picks a free port, held by a bound (not listening) ``SO_REUSEPORT`` socket that
    the workers' own ``SO_REUSEPORT`` sockets may join: close it once they serve. Another
    port is checked free by binding it without ``SO_REUSEPORT``, which fails while any
    server listens there, even one sharing it with ``SO_REUSEPORT``; nothing is held.

    Raises:
        StartupError: the address cannot be resolved or bound.
    """
    name = host.strip("[]") or None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if port == 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    if port != 0:
        sock.close()
        return port, None
    return int(sock.getsockname()[1]), sock


def worker_env(base: Mapping[str, str], *, port: int, index: int, ready: Path) -> dict[str, str]:
    """A worker's environment: the supervisor's, with its port, index and readiness file."""
    own = {
        "SARTIQ_SERVER__PORT": str(port),
        "SARTIQ_SERVER__WORKER_INDEX": str(index),
        "SARTIQ_SERVER__PORT_FILE": str(ready),
    }
    # Settings names are case-insensitive: drop any spelling of ours before adding them.
    env = {k: v for k, v in base.items() if k.upper() not in own}
    env.update(own)
    return env


class Supervisor:
    """Starts ``settings.server.workers`` copies of ``argv`` on one port and keeps them up.

    Args:
        settings: every setting, parsed once; each worker parses the same environment.
        argv: the command line of one worker (the server's own).
    """

    def __init__(self, settings: Settings, argv: Sequence[str]) -> None:
        self._settings = settings
        self._argv = list(argv)
        self._stop = asyncio.Event()
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._exits: dict[int, asyncio.Task[int]] = {}
        self._deaths: deque[float] = deque()
        self._port = 0
        self._directory = Path()

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT; returns the exit status (0 after a clean stop).

        Raises:
            StartupError: several workers on SQLite, or the port cannot be bound.
        """
        check_workers(self._settings)
        s = self._settings.server
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self._port, held = reserve_port(s.host, s.port)
        status: int | None = None
        with tempfile.TemporaryDirectory(prefix="sartiq-workers-") as directory:
            self._directory = Path(directory)
            try:
                try:
                    for index in range(s.workers):
                        await self._spawn(index)
                    status = await self._until_serving()
                finally:
                    if held is not None:
                        held.close()  # the workers listen on the port now (or never will)
                if status is None:
                    self._announce()
                    status = await self._supervise()
            finally:
                stopped = await self._stop_all()
        return status or stopped

    def _ready(self, index: int) -> Path:
        return self._directory / f"worker-{index}.port"

    async def _spawn(self, index: int) -> None:
        previous = self._processes.get(index)
        if previous is not None and previous.stdin is not None:
            previous.stdin.close()
        ready = self._ready(index)
        ready.unlink(missing_ok=True)
        env = worker_env(os.environ, port=self._port, index=index, ready=ready)
        process = await asyncio.create_subprocess_exec(
            *self._argv, env=env, stdin=asyncio.subprocess.PIPE
        )
        self._processes[index] = process
        self._exits[index] = asyncio.create_task(process.wait(), name=f"worker-{index}")
        log.info("started worker %d (pid %d)", index, process.pid)

    async def _until_serving(self) -> int | None:
        """Wait until every worker serves (None), a worker exits, or a stop is asked.

        Returns:
            None when all serve; else the status to exit with: 2 when a worker could not
            start because of a setting or the port (it exited with 2), 1 for any other
            exit, 0 when stopped while starting.
        """
        while not self._stop.is_set():
            for index, exited in self._exits.items():
                if exited.done():
                    code = exited.result()
                    log.error("worker %d exited with status %d before serving", index, code)
                    return 2 if code == 2 else 1
            if all(self._ready(index).exists() for index in self._processes):
                return None
            await self._wait_stop(_POLL_S)
        return 0

    async def _wait_stop(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _announce(self) -> None:
        s = self._settings.server
        if s.port_file is not None:
            tmp = s.port_file.with_name(f".{s.port_file.name}.tmp")
            tmp.write_text(f"{self._port}\n")
            os.replace(tmp, s.port_file)
        pids = ", ".join(str(p.pid) for p in self._processes.values())
        log.info("serving on %s:%d with %d workers (pids %s)", s.host, self._port, s.workers, pids)

    async def _supervise(self) -> int:
        """Restart workers that die, within the bound, until a stop is asked; the status."""
        stopping = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            while True:
                await asyncio.wait(
                    {stopping, *self._exits.values()}, return_when=asyncio.FIRST_COMPLETED
                )
                if self._stop.is_set():
                    return 0
                for index, exited in list(self._exits.items()):
                    if exited.done():
                        if not self._may_restart(index, exited.result()):
                            return 1
                        await self._spawn(index)
        finally:
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping

    def _may_restart(self, index: int, code: int) -> bool:
        """Count a worker's death; whether it may be restarted within the bound."""
        limit = self._settings.server.worker_restarts
        pid = self._processes[index].pid
        now = time.monotonic()
        while self._deaths and now - self._deaths[0] > _RESTART_WINDOW_S:
            self._deaths.popleft()
        if len(self._deaths) >= limit:
            log.error(
                "worker %d (pid %d) exited with status %d, and %d restarts within a minute "
                "is the limit (SARTIQ_SERVER__WORKER_RESTARTS): stopping the server",
                index,
                pid,
                code,
                limit,
            )
            return False
        self._deaths.append(now)
        log.error("worker %d (pid %d) exited with status %d: restarting it", index, pid, code)
        return True

    async def _stop_all(self) -> int:
        """SIGTERM the live workers and wait for them; 0 when all of them stopped cleanly.

        A worker still running after the grace period and a margin is killed. Never raises.
        """
        live = {i: p for i, p in self._processes.items() if p.returncode is None}
        for process in live.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        waiting = [self._exits[index] for index in live]
        if waiting:
            timeout = self._settings.server.grace_period + _STOP_MARGIN_S
            await asyncio.wait(waiting, timeout=timeout)
        status = 0
        for index, process in live.items():
            if process.returncode is None:
                log.error("worker %d (pid %d) did not stop in time: killing it", index, process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            # Killed by our SIGTERM before it could handle it (still starting): clean too.
            if await self._exits[index] not in (0, -signal.SIGTERM):
                status = 1
        for process in self._processes.values():
            if process.stdin is not None:
                process.stdin.close()
        log.info("stopped")
        return status
