"""The single writer: queued changes of many generations, committed together, then published.

Every write of the service goes through one task. It drains whatever is queued, writes
it in one transaction with one ``executemany`` per table, then publishes the committed
events and releases the callers waiting for durability. A caller that is cancelled while
it waits does not stop its write: once queued, a write is committed and published, or
fails as a whole.

On SQLite the rows are turned into plain tuples on the loop, and the whole batch is one
call into a thread of the writer's own that owns a plain (synchronous) connection: a
batch costs one hop to the driver however many rows it holds, and while SQLite inserts,
commits and waits for its file (in C, the GIL released) the loop goes on answering
calls. Elsewhere (PostgreSQL) the batch runs on an async connection, one round trip per
statement.

Event cursors are per organization: its events are numbered 1, 2, 3... in commit order,
so a cursor tells a tenant nothing of the others' volume. On SQLite (one writer per
file) the writer numbers them as it builds a transaction, from the last number committed
(read from the store the first time an organization writes), and keeps the new numbers
only once the transaction committed: a batch that fails leaves no gap. On PostgreSQL,
where several replicas write, the numbers are taken inside the committing transaction
from the organization's counter row (``organization_cursors``), which stays locked until
that transaction ends: a replica numbering the same organization waits for it, so a
number never becomes visible after a larger one and a reader polling by cursor never
skips one still in flight (DESIGN §13). The organizations of a batch are locked in one
order, first thing in the transaction, so two batches cannot deadlock on them. The same
statement sends the NOTIFY (delivered at commit, see ``server.store.hints``) that wakes
the other replicas' watchers.

Where replicas share the database, a write names the live generation it changes, and the
transaction locks those generations (after the cursor rows, before the live counts: one
lock order everywhere) and checks their fencing numbers against the ones this replica
holds them with (``leases``): the writes of a generation another replica has claimed
since fail with LeaseLost and nothing of them is written; the rest of the batch commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Table,
    bindparam,
    func,
    literal_column,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Executable

from server.domain.events import GenerationEvent
from server.domain.states import GENERATION_TERMINAL
from server.store import hints, sqlite_batch
from server.store.events import EventBus
from server.store.leases import FENCES, LeaseLost, Leases
from server.store.live_counts import LimitReached, LiveCounts, LiveLimits, Tally
from server.store.rows import EVENTS, GENERATIONS, TABLE_ORDER, Mode, Op

log = logging.getLogger(__name__)
_T = TypeVar("_T")
MAX_BATCH = 2000
_TERMINAL = frozenset(s.value for s in GENERATION_TERMINAL)

# A test seam: awaited inside the transaction once its event cursors are taken (with
# the last cursor taken per organization), before anything else is written.
AfterNumbering = Callable[[dict[str, int]], Awaitable[None]]

# Raise the counters of a batch's organizations, in one order (no deadlock between two
# batches), and send the wake-up; pg_notify runs once per row, and PostgreSQL delivers
# identical notifications of one transaction once.
_TAKE_CURSORS = text(
    """
    WITH taken AS (
        INSERT INTO organization_cursors (organization, last_cursor)
        SELECT o, n
        FROM unnest(CAST(:organizations AS VARCHAR[]), CAST(:counts AS INTEGER[])) AS t(o, n)
        ORDER BY o
        ON CONFLICT (organization)
        DO UPDATE SET last_cursor = organization_cursors.last_cursor + excluded.last_cursor
        RETURNING organization, last_cursor
    )
    SELECT organization, last_cursor, pg_notify(:channel, :hint) AS notified FROM taken
    """
)


@dataclass
class WriterStats:
    """What the writer did, for the benchmark: writes, transactions, statements, hops."""

    writes: int = 0
    transactions: int = 0
    statements: int = 0
    driver_calls: int = 0
    rows: int = 0
    failed_batches: int = 0
    busy_seconds: float = 0.0
    refused: int = 0  # creates refused by the deployment's limits (their batch rolled back)


@dataclass(slots=True)
class _Write:
    ops: list[Op]
    events: list[GenerationEvent]
    done: asyncio.Future[None]
    admit: str | None = None  # a create: its organization, for the deployment's limits
    generation: str | None = None  # the live generation it changes (fenced on PostgreSQL)
    new: bool = False  # it creates that generation


@dataclass
class _Statements:
    """Statements per (table, mode), compiled once per dialect."""

    dialect: str
    lease_seconds: float = 30.0
    cache: dict[tuple[str, Mode], Executable] = field(default_factory=dict)

    def get(self, op: Op) -> Executable:
        key = (op.table.name, op.mode)
        statement = self.cache.get(key)
        if statement is None:
            statement = self.cache[key] = self._build(op)
        return statement

    def _build(self, op: Op) -> Executable:
        table = op.table
        keys = [c.name for c in table.primary_key.columns]
        if op.mode is Mode.INSERT:
            return table.insert()
        if op.mode is Mode.DELETE:
            clause = [table.c[k] == bindparam(f"b_{k}") for k in keys]
            return table.delete().where(*clause)
        module: Any = postgresql if self.dialect == "postgresql" else sqlite
        insert = module.insert(table)
        built: Executable
        if op.mode is Mode.IGNORE:
            built = insert.on_conflict_do_nothing(index_elements=keys)
        elif op.mode is Mode.OWN:
            recipe = func.coalesce(table.c.recipe, insert.excluded.recipe)
            built = insert.on_conflict_do_update(index_elements=keys, set_={"recipe": recipe})
        else:
            skip = set(keys)
            if table is GENERATIONS and self.dialect == "postgresql":
                # Claims, renewals and cancel requests have statements of their own
                # (``leases``); a new generation's lease starts on the database's clock.
                skip |= {"lease_expires_at", "fence", "cancel_requested_at"}
                until = f"timezone('UTC', now()) + interval '{float(self.lease_seconds)} seconds'"
                insert = insert.values(lease_expires_at=literal_column(until))
            columns = [c.name for c in table.columns if c.name not in skip]
            built = insert.on_conflict_do_update(
                index_elements=keys, set_={c: insert.excluded[c] for c in columns}
            )
        return built


# Each table's primary key columns, by table name (SQLAlchemy's own lookup is slow).
_PRIMARY_KEYS = {
    table.name: tuple(c.name for c in table.primary_key.columns) for table, _ in TABLE_ORDER
}


def _key(op: Op) -> tuple[Any, ...]:
    row = op.row
    return tuple([row[name] for name in _PRIMARY_KEYS[op.table.name]])


Group = tuple[Table, Mode, list[dict[str, Any]]]


def group(ops: Sequence[Op]) -> list[Group]:
    """The rows of a batch by (table, mode), in table order, the last row per key winning."""
    grouped: dict[tuple[str, Mode], dict[tuple[Any, ...], Op]] = {}
    for op in ops:
        grouped.setdefault((op.table.name, op.mode), {})[_key(op)] = op
    groups: list[Group] = []
    for table, mode in TABLE_ORDER:
        found = grouped.get((table.name, mode))
        if found:
            groups.append((table, mode, [op.row for op in found.values()]))
    return groups


class _Backend:
    """Writes a batch in one transaction; how depends on the database."""

    dialect = ""
    # Whether ``write`` numbers the event rows itself, inside its transaction.
    numbers_events = False
    # Which replica the wake-ups it sends come from (set by the Writer).
    origin = ""

    async def write(
        self, groups: list[Group], tally: Tally, fences: dict[str, int]
    ) -> tuple[int, int]:
        """Write the groups in one transaction; returns (statements, driver calls).

        ``fences``: the generations the batch changes, with the fencing number this
        replica holds each with (empty where one process owns the database).

        Raises:
            LimitReached: the deployment's counts refused creates of ``tally`` (nothing
                was written).
            LeaseLost: another replica claimed some of ``fences`` (nothing was written).
        """
        raise NotImplementedError

    async def last_cursor(self, organization: str) -> int:
        """The largest event cursor stored for ``organization`` (0 when it has none)."""
        raise NotImplementedError

    async def renew(self, owner: str, expiry: datetime) -> None:
        """Extend the leases of every generation ``owner`` holds (replicas: ``Leases``)."""

    async def claim(self, owner: str, expiry: datetime) -> list[str]:
        """Make ``owner`` the runner of every unfinished generation; their ids, oldest first.

        Only where one process owns the database; replicas claim through ``Leases``.
        """
        raise NotImplementedError

    async def close(self) -> None:
        """Release the connection."""


class _SqliteBackend(_Backend):
    """SQLite: rows converted on the loop, each batch run in C on the writer's own thread.

    Every call on the connection goes through that one thread, in the order the writer
    makes them, so the connection is never used by two threads at once.
    """

    dialect = "sqlite"

    def __init__(self, connection: sqlite_batch.Connection) -> None:
        self._connection = connection
        self._statements: dict[tuple[str, Mode], sqlite_batch.Statement] = {}
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")

    def _statement(self, table: Table, mode: Mode) -> sqlite_batch.Statement:
        statement = self._statements.get((table.name, mode))
        if statement is None:
            statement = self._statements[(table.name, mode)] = sqlite_batch.Statement(table, mode)
        return statement

    async def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def write(
        self, groups: list[Group], tally: Tally, fences: dict[str, int]
    ) -> tuple[int, int]:
        # One process per SQLite file: the engine counts live generations in memory, and
        # no other process can hold a generation.
        prepared = []
        for table, mode, rows in groups:
            statement = self._statement(table, mode)
            prepared.append((statement.sql, list(map(statement.parameters, rows))))
        await self._call(self._connection.write, prepared)
        return len(prepared), 1

    async def last_cursor(self, organization: str) -> int:
        rows = await self._call(
            self._connection.query,
            "SELECT max(cursor) FROM generation_events WHERE organization = ?",
            (organization,),
        )
        return int(rows[0][0] or 0)

    async def renew(self, owner: str, expiry: datetime) -> None:
        await self._call(
            self._connection.execute,
            "UPDATE generations SET lease_expires_at = ? WHERE owner = ?",
            (sqlite_batch.to_sqlite_datetime(expiry), owner),
        )

    async def claim(self, owner: str, expiry: datetime) -> list[str]:
        return await self._call(self._claim, owner, expiry)

    def _claim(self, owner: str, expiry: datetime) -> list[str]:
        terminal = ", ".join(f"'{s.value}'" for s in GENERATION_TERMINAL)
        where = f"status NOT IN ({terminal})"
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            rows = connection.query(
                f"SELECT id FROM generations WHERE {where} ORDER BY created_at, id", ()
            )
            connection.execute(
                f"UPDATE generations SET owner = ?, lease_expires_at = ? WHERE {where}",
                (owner, sqlite_batch.to_sqlite_datetime(expiry)),
            )
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return [row[0] for row in rows]

    async def close(self) -> None:
        try:
            await self._call(self._connection.close)
        finally:
            self._thread.shutdown(wait=True)


class _AsyncBackend(_Backend):
    """PostgreSQL: SQLAlchemy Core on an async connection, one round trip per statement.

    Event cursors are taken in the transaction (see the module docstring).
    """

    numbers_events = True

    def __init__(
        self,
        engine: AsyncEngine,
        counts: LiveCounts | None,
        *,
        after_numbering: AfterNumbering | None,
        lease_seconds: float,
    ) -> None:
        self._engine = engine
        self.dialect = engine.dialect.name
        self._statements = _Statements(self.dialect, lease_seconds)
        self._counts = counts
        self._after_numbering = after_numbering

    async def write(
        self, groups: list[Group], tally: Tally, fences: dict[str, int]
    ) -> tuple[int, int]:
        statements = self._statements
        counts = self._counts if tally else None
        events = next((rows for table, _, rows in groups if table is EVENTS), [])

        def run(connection: Connection) -> int:
            # The deployment's live counts: endings are read before the rows are written,
            # the counts changed last, so their rows stay locked only until the commit.
            ended = None if counts is None else counts.ending(connection, tally)
            for table, mode, rows in groups:
                params = rows
                if mode is Mode.DELETE:
                    params = [{f"b_{k}": v for k, v in row.items()} for row in rows]
                connection.execute(statements.get(Op(table, mode, rows[0])), params)
            if counts is None or ended is None:
                return 0
            return bool(tally.finishing) + counts.apply(connection, tally, ended)

        async with self._engine.begin() as connection:
            # Locks in one order in every transaction: cursors, generations, counts.
            if events:
                taken = await self._number(connection, events)
                if self._after_numbering is not None:
                    await self._after_numbering(taken)
            if fences:
                await _check_fences(connection, fences)
            extra = await connection.run_sync(run)
        extra += (1 if events else 0) + (1 if fences else 0)  # numbering, fencing
        # BEGIN and COMMIT are round trips too.
        return len(groups) + extra, len(groups) + extra + 2

    async def _number(
        self, connection: AsyncConnection, events: list[dict[str, Any]]
    ) -> dict[str, int]:
        """Give ``events`` (rows, in commit order) their cursors; the last one per org."""
        counts = Counter(row["organization"] for row in events)
        organizations = sorted(counts)
        result = await connection.execute(
            _TAKE_CURSORS,
            {
                "organizations": organizations,
                "counts": [counts[o] for o in organizations],
                "channel": hints.CHANNEL,
                "hint": hints.encode(self.origin, events),
            },
        )
        taken = {row.organization: int(row.last_cursor) for row in result}
        following = {o: taken[o] - counts[o] for o in organizations}
        for row in events:
            following[row["organization"]] += 1
            row["cursor"] = following[row["organization"]]
        return taken


async def _check_fences(connection: AsyncConnection, fences: dict[str, int]) -> None:
    """Lock the generations a batch changes; raise unless this replica still holds each.

    Raises:
        LeaseLost: another replica claimed some of them since (their stored fencing
            number is no longer this replica's).
    """
    rows = (await connection.execute(FENCES, {"ids": list(fences)})).all()
    stored = {row.id: int(row.fence) for row in rows}
    lost = {i for i, fence in fences.items() if stored.get(i) != fence}
    if lost:
        raise LeaseLost(lost)


class Writer:
    """Owns every database write: group commits, then publishing, then releasing waiters.

    Args:
        backend: how batches reach the database (see ``for_sqlite`` / ``for_async``).
        bus: where committed events are published.
        lease_seconds: how long this process's claim on its live generations holds
            unless renewed; the writer renews it every third of that.
        name: this replica's name, the owner it records (a random one by default).
        leases: where replicas share the database, this replica's claims: a change of
            a generation commits only while the replica still holds it.
    """

    def __init__(
        self,
        backend: _Backend,
        bus: EventBus,
        *,
        lease_seconds: float,
        name: str | None = None,
        leases: Leases | None = None,
    ) -> None:
        self._backend = backend
        self._bus = bus
        self._lease = lease_seconds
        self.owner = name or f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"
        self.leases = leases
        # Told the generations another replica took from this one (see ``Engine``).
        self.on_lost: Callable[[set[str]], None] | None = None
        backend.origin = self.owner  # the wake-ups it sends name this replica
        self.stats = WriterStats()
        self._queue: asyncio.Queue[_Write] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        # The last event cursor committed, per organization that wrote since the start.
        self._cursors: dict[str, int] = {}
        self._closed = False

    @classmethod
    def for_sqlite(
        cls,
        path: str,
        bus: EventBus,
        *,
        busy_timeout_ms: int,
        lease_seconds: float,
        name: str | None = None,
    ) -> Writer:
        """A writer with its own thread and connection on the SQLite file at ``path``."""
        connection = sqlite_batch.Connection(path, busy_timeout_ms=busy_timeout_ms)
        return cls(_SqliteBackend(connection), bus, lease_seconds=lease_seconds, name=name)

    @classmethod
    def for_async(
        cls,
        engine: AsyncEngine,
        bus: EventBus,
        *,
        lease_seconds: float,
        limits: LiveLimits | None = None,
        after_numbering: AfterNumbering | None = None,
        leases: Leases | None = None,
    ) -> Writer:
        """A writer over the service's async engine (PostgreSQL).

        With ``limits``, creates must fit the deployment's live counts (see
        ``live_counts``) or fail with ResourceExhaustedError. With ``leases``, changes of
        a generation commit only while this replica holds it (its fencing number), or
        fail with LeaseLost. ``after_numbering`` is a test seam: awaited in each
        transaction with events once their cursors are taken, before the rest is
        written and committed.
        """
        counts = None if limits is None else LiveCounts(limits)
        backend = _AsyncBackend(
            engine, counts, after_numbering=after_numbering, lease_seconds=lease_seconds
        )
        name = None if leases is None else leases.name
        return cls(backend, bus, lease_seconds=lease_seconds, name=name, leases=leases)

    def lease_expiry(self) -> datetime:
        """When a claim made now runs out unless renewed."""
        return datetime.now(UTC) + timedelta(seconds=self._lease)

    async def start(self) -> None:
        """Start writing."""
        self._task = asyncio.create_task(self._run(), name="store-writer")

    def submit(
        self,
        ops: list[Op],
        events: list[GenerationEvent],
        *,
        admit: str | None = None,
        generation: str | None = None,
        new: bool = False,
    ) -> asyncio.Future[None]:
        """Queue a write; the future resolves once it is committed and its events published.

        ``admit`` marks a write that creates a generation of that organization: where the
        database counts the deployment's live generations, the future fails with
        ResourceExhaustedError (and nothing is written) when a limit leaves no room.
        ``generation`` names the live generation the write changes (``new``: creates):
        where replicas share the database, the future fails with LeaseLost (and nothing
        is written) once another replica holds it.

        Raises:
            RuntimeError: the writer is shut down.
        """
        if self._closed:
            raise RuntimeError("the writer is shut down")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Write(ops, events, done, admit, generation, new))
        return done

    async def write(self, ops: list[Op], events: Sequence[GenerationEvent] = ()) -> None:
        """Queue a write and wait until it is durable (cancelling the wait does not undo it)."""
        await asyncio.shield(self.submit(ops, list(events)))

    async def shutdown(self) -> None:
        """Commit what is queued, then stop; idempotent."""
        self._closed = True
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            await self._backend.close()

    async def _run(self) -> None:
        while True:
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout=self._lease / 3)
            except TimeoutError:
                await self._renew_leases()
                continue
            # One turn of the loop lets every ready task queue its write: they share the
            # transaction (and what is queued while it commits goes in the next one).
            await asyncio.sleep(0)
            batch = [first]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[_Write]) -> None:
        while batch:
            try:
                await self._transaction(batch)
            except LimitReached as limit:
                # Refused creates are answered alone; the rest of the batch goes again.
                batch = self._refuse(batch, limit)
                continue
            except LeaseLost as lost:
                # Another replica runs these now: their writes fail, the rest goes again.
                batch = self._fence_out(batch, lost)
                continue
            except Exception as exc:
                await self._isolate(batch, exc)
                return
            self._done(batch)
            return

    async def _isolate(self, batch: list[_Write], exc: Exception) -> None:
        """A batch failed: fail its only write, or write each again alone to find the culprit."""
        self.stats.failed_batches += 1
        if len(batch) == 1:
            log.warning("a write failed: %s", type(exc).__name__)
            _fail(batch[0], exc)
            return
        for write in batch:
            try:
                await self._transaction([write])
            except LimitReached as limit:
                self._refuse([write], limit)
            except LeaseLost as lost:
                self._fence_out([write], lost)
            except Exception as single:
                log.warning("a write failed: %s", type(single).__name__)
                _fail(write, single)
            else:
                self._done([write])

    def _refuse(self, batch: list[_Write], limit: LimitReached) -> list[_Write]:
        """Fail the creates ``limit`` refused; the writes of ``batch`` left."""
        self.stats.refused += len(limit.refused)
        for index, error in limit.refused.items():
            _fail(batch[index], error)
        return [write for index, write in enumerate(batch) if index not in limit.refused]

    def _fence_out(self, batch: list[_Write], lost: LeaseLost) -> list[_Write]:
        """Fail the writes of generations another replica holds now; the writes left."""
        log.warning(
            "%d generations were claimed by another replica; this one stops running them",
            len(lost.ids),
        )
        if self.leases is not None:
            for generation_id in lost.ids:
                self.leases.forget(generation_id)
        if self.on_lost is not None:
            self.on_lost(lost.ids)
        kept = []
        for write in batch:
            if write.generation in lost.ids:
                _fail(write, LeaseLost({write.generation}))
            else:
                kept.append(write)
        return kept

    async def _transaction(self, batch: list[_Write]) -> None:
        cursors: dict[str, int] = {}  # numbers taken by this transaction, per organization
        ops: list[Op] = []
        finishing: list[str] = []  # generations written in a terminal state
        numbered = self._backend.numbers_events  # else numbered here, from memory
        for write in batch:
            for op in write.ops:
                if op.table is EVENTS and not numbered:
                    organization = op.row["organization"]
                    cursor = cursors.get(organization)
                    if cursor is None:
                        cursor = await self._last_cursor(organization)
                    cursors[organization] = op.row["cursor"] = cursor + 1
                elif op.table is GENERATIONS and op.row["status"] in _TERMINAL:
                    finishing.append(op.row["id"])
                ops.append(op)
        tally = Tally([write.admit for write in batch], finishing)
        fences = self._fences(batch)
        started = time.perf_counter()
        statements, calls = await self._backend.write(group(ops), tally, fences)
        self.stats.busy_seconds += time.perf_counter() - started
        self._cursors.update(cursors)  # committed: the numbers are taken
        if self.leases is not None:
            for write in batch:
                if write.new and write.generation is not None:
                    self.leases.adopt(write.generation)
            for generation_id in finishing:  # ended: nothing more to hold
                self.leases.forget(generation_id)
        self.stats.transactions += 1
        self.stats.statements += statements
        self.stats.driver_calls += calls
        self.stats.rows += len(ops)

    def _fences(self, batch: list[_Write]) -> dict[str, int]:
        """The generations ``batch`` changes that must still be this replica's, and how.

        A generation this replica does not hold (any more) gets -1, which no stored
        number matches: its write fails.
        """
        if self.leases is None:
            return {}
        created = {w.generation for w in batch if w.new}
        return {
            w.generation: self.leases.fences.get(w.generation, -1)
            for w in batch
            if w.generation is not None and w.generation not in created
        }

    async def _last_cursor(self, organization: str) -> int:
        """The organization's last committed cursor, read from the store the first time."""
        last = self._cursors.get(organization)
        if last is None:
            last = self._cursors[organization] = await self._backend.last_cursor(organization)
        return last

    def _done(self, batch: list[_Write]) -> None:
        """Publish what was committed, then release the waiters."""
        for write in batch:
            event_ops = [op for op in write.ops if op.table is EVENTS]
            for event, op in zip(write.events, event_ops, strict=True):
                event.cursor = int(op.row["cursor"])
            self._bus.publish(write.events)
            self.stats.writes += 1
            if not write.done.done():
                write.done.set_result(None)

    async def claim_unfinished(self) -> list[str]:
        """Claim every unfinished generation for this process; their ids, oldest first.

        Only where one process owns the database (SQLite: any other holder is this
        process's dead predecessor); replicas claim through ``Leases``.
        """
        return await self._backend.claim(self.owner, self.lease_expiry())

    async def _renew_leases(self) -> None:
        try:
            await self._backend.renew(self.owner, self.lease_expiry())
        except Exception:
            log.exception("renewing the leases failed; retrying at the next interval")


class DuplicateKeyError(Exception):
    """A write broke a unique constraint: what it inserts exists already (either database)."""


def _fail(write: _Write, exc: Exception) -> None:
    if isinstance(exc, sqlite3.IntegrityError | IntegrityError):
        failure: Exception = DuplicateKeyError(str(exc))
        failure.__cause__ = exc
    else:
        failure = exc
    if not write.done.done():
        write.done.set_exception(failure)
