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
worker's stdin is one end of a socket pair whose other end only the supervisor holds:
the worker writes ``SERVING`` there once it serves, and when the supervisor dies, even
by SIGKILL, the worker reads the end of it and shuts down instead of serving on as an
orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from server.config import Settings
from server.domain.errors import StartupError
from server.store.db import is_sqlite

log = logging.getLogger(__name__)

# What a worker writes to its stdin, the supervisor's socket, once it serves.
SERVING = b"serving\n"
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


def worker_env(base: Mapping[str, str], *, port: int, index: int) -> dict[str, str]:
    """A worker's environment: the supervisor's, with its port and index and no port file."""
    own = {"SARTIQ_SERVER__PORT": str(port), "SARTIQ_SERVER__WORKER_INDEX": str(index)}
    # Settings names are case-insensitive: drop any spelling of ours before adding them.
    # The port file is the supervisor's to write, once every worker serves.
    dropped = {*own, "SARTIQ_SERVER__PORT_FILE"}
    env = {k: v for k, v in base.items() if k.upper() not in dropped}
    env.update(own)
    return env


@dataclass
class _Worker:
    """A worker process, the supervisor's end of its stdin, and the task awaiting its exit."""

    process: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    exited: asyncio.Task[int]

    def close(self) -> None:
        """Close our end of its stdin; never raises."""
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()


def _said_serving(told: asyncio.Task[bytes]) -> bool:
    return told.exception() is None and told.result() == SERVING


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
        self._workers: dict[int, _Worker] = {}
        self._deaths: deque[float] = deque()
        self._port = 0

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

    async def _spawn(self, index: int) -> None:
        previous = self._workers.pop(index, None)
        if previous is not None:
            previous.close()
        ours, theirs = socket.socketpair()
        try:
            env = worker_env(os.environ, port=self._port, index=index)
            process = await asyncio.create_subprocess_exec(
                *self._argv, env=env, stdin=theirs.fileno()
            )
            reader, writer = await asyncio.open_connection(sock=ours)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker holds its end; ours ends when we do
        exited = asyncio.create_task(process.wait(), name=f"worker-{index}")
        self._workers[index] = _Worker(process, reader, writer, exited)
        log.info("started worker %d (pid %d)", index, process.pid)

    async def _until_serving(self) -> int | None:
        """Wait until every worker serves (None), a worker exits, or a stop is asked.

        Returns:
            None when all serve; else the status to exit with: 2 when a worker could not
            start because of a setting or the port (it exited with 2), 1 for any other
            exit, 0 when stopped while starting.
        """
        told = {
            asyncio.create_task(w.reader.readline(), name=f"ready-{i}"): i
            for i, w in self._workers.items()
        }
        exits = {w.exited: i for i, w in self._workers.items()}
        stopping = asyncio.create_task(self._stop.wait(), name="stop")
        waiting = set(told)
        try:
            while waiting:
                done, _ = await asyncio.wait(
                    {stopping, *waiting, *exits}, return_when=asyncio.FIRST_COMPLETED
                )
                if stopping in done:
                    return 0
                # A worker that ended its stdin without saying SERVING is exiting.
                ended = [i for t, i in exits.items() if t in done]
                ended += [i for t, i in told.items() if t in done and not _said_serving(t)]
                if ended:
                    index = ended[0]
                    code = await self._workers[index].exited
                    log.error("worker %d exited with status %d before serving", index, code)
                    return 2 if code == 2 else 1
                waiting -= done
            return None
        finally:
            for task in (stopping, *told):
                task.cancel()
            await asyncio.gather(stopping, *told, return_exceptions=True)

    def _announce(self) -> None:
        s = self._settings.server
        if s.port_file is not None:
            tmp = s.port_file.with_name(f".{s.port_file.name}.tmp")
            tmp.write_text(f"{self._port}\n")
            os.replace(tmp, s.port_file)
        pids = ", ".join(str(w.process.pid) for w in self._workers.values())
        log.info("serving on %s:%d with %d workers (pids %s)", s.host, self._port, s.workers, pids)

    async def _supervise(self) -> int:
        """Restart workers that die, within the bound, until a stop is asked; the status."""
        stopping = asyncio.create_task(self._stop.wait(), name="stop")
        try:
            while True:
                exits = {w.exited for w in self._workers.values()}
                await asyncio.wait({stopping, *exits}, return_when=asyncio.FIRST_COMPLETED)
                if self._stop.is_set():
                    return 0
                for index, worker in list(self._workers.items()):
                    if worker.exited.done():
                        if not self._may_restart(index, worker.exited.result()):
                            return 1
                        await self._spawn(index)
        finally:
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stopping

    def _may_restart(self, index: int, code: int) -> bool:
        """Count a worker's death; whether it may be restarted within the bound."""
        limit = self._settings.server.worker_restarts
        pid = self._workers[index].process.pid
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
        live = {i: w for i, w in self._workers.items() if w.process.returncode is None}
        for worker in live.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        if live:
            timeout = self._settings.server.grace_period + _STOP_MARGIN_S
            await asyncio.wait([w.exited for w in live.values()], timeout=timeout)
        status = 0
        for index, worker in live.items():
            if worker.process.returncode is None:
                log.error(
                    "worker %d (pid %d) did not stop in time: killing it", index, worker.process.pid
                )
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
            # Killed by our SIGTERM before it could handle it (still starting): clean too.
            if await worker.exited not in (0, -signal.SIGTERM):
                status = 1
        for worker in self._workers.values():
            worker.close()
        log.info("stopped")
        return status
