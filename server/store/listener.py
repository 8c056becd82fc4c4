"""One LISTEN connection per replica: another replica's commit wakes this one's watchers.

Each commit with events sends a NOTIFY (``server.store.hints``). This replica keeps one
dedicated asyncpg connection listening for them, outside the engine's pool, and hands
every hint that is not its own to the bus, whose watchers then read the store. The
connection is probed every ``probe_interval`` seconds (a connection cut without a word,
as a dead network path leaves it, only shows when a query gets no answer) and
reconnected with capped, jittered backoff. While it is down nothing is lost: watchers
check the store at every heartbeat, and each (re)connection wakes every watcher, since
hints sent meanwhile were missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import make_url

from server.domain.errors import StartupError
from server.store import hints
from server.store.events import EventBus
from server.store.leases import COMMANDS, Wakeups

log = logging.getLogger(__name__)

APPLICATION_NAME = "sartiq-listen"
_SQLALCHEMY_ONLY = ("prepared_statement_cache_size", "prepared_statement_name_func")
Connect = Callable[[], Awaitable[Any]]  # an asyncpg connection (asyncpg ships no types)


def asyncpg_connector(url: str, *, timeout: float) -> Connect:
    """Opens asyncpg connections to the database ``url`` names (a SQLAlchemy URL).

    Raises:
        StartupError: ``url`` is not a PostgreSQL URL.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or parsed.get_driver_name() not in (
        "asyncpg",
        "psycopg2",  # the plain postgresql:// spelling
    ):
        raise StartupError(
            "SARTIQ_DATABASE__LISTEN_URL must be a postgresql:// or postgresql+asyncpg:// URL"
        )
    # The libpq form asyncpg reads (credentials included: never log it), without the
    # options only SQLAlchemy's dialect understands (asyncpg would send them to the
    # server as settings, and the server would refuse the connection).
    plain = parsed.set(drivername="postgresql").difference_update_query(_SQLALCHEMY_ONLY)
    dsn = plain.render_as_string(hide_password=False)
    settings = {"application_name": APPLICATION_NAME}

    async def connect() -> Any:
        import asyncpg  # the postgres extra; SQLite deployments never get here

        return await asyncpg.connect(dsn, timeout=timeout, server_settings=settings)

    return connect


class EventListener:
    """Listens for other replicas' hints and wakes the bus's watchers.

    Args:
        connect: opens a new connection (``asyncpg_connector``).
        bus: whose watchers the hints wake.
        origin: this replica's name in the hints it sends itself, which it ignores.
        probe_interval: seconds between liveness probes; also how long a probe, or a
            connection attempt, may take, and the longest wait between attempts.
        commands: told of every notification on ``leases.COMMANDS`` (a replica released
            its generations, recorded a cancel, or left one to the deployment's line), and
            of every (re)connection (``ANY``: notifications may have been missed).
    """

    def __init__(
        self,
        connect: Connect,
        bus: EventBus,
        *,
        origin: str,
        probe_interval: float,
        commands: Wakeups | None = None,
    ) -> None:
        self._connect = connect
        self._bus = bus
        self._origin = origin
        self._commands = commands
        self._interval = probe_interval
        self._timeout = max(probe_interval, 1.0)
        self._connection: Any = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether hints reach this replica now."""
        return self._connection is not None and not self._connection.is_closed()

    async def start(self) -> None:
        """Connect (one attempt, so a replica usually listens before it serves), then run."""
        try:
            await self._listen()
        except Exception as exc:
            await self._close()
            log.warning("not listening for other replicas' events yet (%s); retrying", _why(exc))
        self._task = asyncio.create_task(self._run(), name="event-listener")

    async def shutdown(self) -> None:
        """Stop listening and close the connection; idempotent, never raises."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self._close()

    async def _run(self) -> None:
        failures = 0
        while True:
            if self.connected:
                try:
                    await self._probe_until_lost()
                except Exception as exc:
                    log.warning("the listening connection failed (%s); reconnecting", _why(exc))
                await self._close()
            try:
                await self._listen()
            except Exception as exc:
                failures += 1
                await self._close()
                delay = min(self._interval, 0.1 * 2**failures) * random.uniform(0.5, 1.0)
                log.warning(
                    "listening for other replicas failed (%s); again in %.1f s", _why(exc), delay
                )
                await asyncio.sleep(delay)
            else:
                failures = 0

    async def _listen(self) -> None:
        """Open the connection, LISTEN, and wake every watcher: hints may have been missed."""
        # One event per connection: the old one's close must not end the new one's watch.
        lost = self._lost = asyncio.Event()
        connection = self._connection = await self._connect()
        connection.add_termination_listener(lambda _: lost.set())
        await connection.add_listener(hints.CHANNEL, self._notified)
        if self._commands is not None:
            await connection.add_listener(COMMANDS, self._commanded)
            self._commands.notify(Wakeups.ANY)
        log.info("listening for other replicas' events")
        self._bus.wake(None)

    async def _probe_until_lost(self) -> None:
        """Return when the connection closes; raise when a probe fails."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._lost.wait()
                return
            await self._connection.fetchval("SELECT 1", timeout=self._timeout)

    def _notified(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        hint = hints.decode(payload)
        if hint is None:
            self._bus.wake(None)
        elif hint.origin != self._origin:  # this replica published its own already
            self._bus.wake(hint.organizations)

    def _commanded(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        if self._commands is not None:
            self._commands.notify(payload)  # a wake-up only: the engine reads what to do

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            # terminate(): no goodbye to a server that may not answer.
            with contextlib.suppress(Exception):
                connection.terminate()


def _why(exc: Exception) -> str:
    """A short reason for the log: the exception's type and a bounded excerpt."""
    message = str(exc)[:200]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
