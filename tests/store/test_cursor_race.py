"""Per-organization cursors when several writers (replicas) commit events of one organization.

Two writers on two engines share one PostgreSQL database, as two replicas do, and a
reader on a third engine polls by cursor with the query ``WatchGenerations`` uses. A
number taken inside a transaction must never become visible after a larger one taken by
a transaction that committed first: a reader that had moved past the larger one would
skip the smaller for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from helpers import assert_eventually
from pg import fresh_database, requires_postgres
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from server.config import DatabaseSettings
from server.domain.enums import EventKind
from server.domain.events import GenerationEvent
from server.domain.filters import GenerationFilter
from server.domain.model import PredictionCounts
from server.domain.recorder import utcnow
from server.store import repository
from server.store.db import create_engine, create_session_factory
from server.store.events import EventBus
from server.store.migrate import upgrade_to_head
from server.store.rows import EVENTS, GENERATIONS, Mode, Op, event_row
from server.store.writer import AfterNumbering, Writer

pytestmark = requires_postgres


@pytest.fixture
async def database() -> AsyncIterator[DatabaseSettings]:
    async with fresh_database() as url:
        settings = DatabaseSettings(url=url)
        await upgrade_to_head(settings)
        yield settings


@dataclass
class Replica:
    """A writer on its own engine, and the last sequence of each generation it wrote."""

    engine: AsyncEngine
    writer: Writer
    sequences: dict[str, int] = field(default_factory=dict)

    async def generation(self, organization: str) -> str:
        generation_id = str(uuid.uuid4())
        row = _generation(generation_id, organization)
        await self.writer.write([Op(GENERATIONS, Mode.UPSERT, row)])
        self.sequences[generation_id] = 0
        return generation_id

    def write(self, *targets: tuple[str, str]) -> asyncio.Future[None]:
        """Queue one new event for each (organization, generation), in that order."""
        events = []
        for organization, generation_id in targets:
            self.sequences[generation_id] += 1
            events.append(
                GenerationEvent(
                    generation_id=generation_id,
                    sequence=self.sequences[generation_id],
                    time=utcnow(),
                    kind=EventKind.GENERATION_CHANGED,
                    terminal=False,
                    counts=PredictionCounts(),
                    organization=organization,
                )
            )
        return self.writer.submit([Op(EVENTS, Mode.INSERT, event_row(e)) for e in events], events)


def _generation(generation_id: str, organization: str) -> dict[str, Any]:
    return {
        "id": generation_id,
        "organization": organization,
        "type": "BASE",
        "strategy": "GENERATE",
        "status": "PROCESSING",
        "request_id": None,
        "fingerprint": "",
        "params": {},
        "orchestration": {},
        "error": None,
        "created_at": utcnow(),
        "started_at": None,
        "finished_at": None,
        "deadline_at": None,
        "event_seq": 0,
        "refinement": None,
        "owner": None,
        "lease_expires_at": None,
    }


@contextlib.asynccontextmanager
async def _replicas(
    settings: DatabaseSettings, *hooks: AfterNumbering | None
) -> AsyncIterator[list[Replica]]:
    """One replica's writer per hook, each on its own engine."""
    replicas: list[Replica] = []
    try:
        for hook in hooks:
            engine = create_engine(settings)
            writer = Writer.for_async(engine, EventBus(), lease_seconds=30.0, after_numbering=hook)
            replicas.append(Replica(engine, writer))
            await writer.start()
        yield replicas
    finally:
        for replica in replicas:
            await replica.writer.shutdown()
            await replica.engine.dispose()


class Reader:
    """Polls one organization's events by cursor, as WatchGenerations does; notes each."""

    def __init__(self, engine: AsyncEngine, organization: str) -> None:
        self._sessions = create_session_factory(engine)
        self._organization = organization
        self._last = 0
        self.cursors: list[int] = []
        self.polls = 0

    async def run(self) -> None:
        while True:
            async with self._sessions() as session:
                found, self._last = await repository.organization_events_after(
                    session, self._organization, GenerationFilter(), self._last, 100
                )
            self.cursors += [event.cursor for event in found]
            self.polls += 1
            await asyncio.sleep(0.002)  # the polling pace, not a wait for something

    async def another_round(self) -> None:
        """Return once the reader has read twice more (a whole poll after this call)."""
        start = self.polls
        await assert_eventually(_at_least(lambda: self.polls, start + 2))


def _at_least(value: Callable[[], int], target: int) -> Callable[[], Awaitable[bool]]:
    async def reached() -> bool:
        return value() >= target

    return reached


class Gate:
    """Holds the first transaction that takes cursors open until released."""

    def __init__(self) -> None:
        self.numbered = asyncio.Event()
        self.release = asyncio.Event()
        self.taken: dict[str, int] = {}

    async def hold(self, taken: dict[str, int]) -> None:
        if not self.numbered.is_set():
            self.taken = dict(taken)
            self.numbered.set()
            await self.release.wait()


async def _lock_waits(engine: AsyncEngine) -> int:
    query = text(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    async with engine.connect() as connection:
        return int((await connection.execute(query)).scalar() or 0)


async def _stored(engine: AsyncEngine, organization: str) -> list[tuple[str, int]]:
    query = text(
        "SELECT generation_id, cursor FROM generation_events"
        " WHERE organization = :org ORDER BY cursor"
    )
    async with engine.connect() as connection:
        rows = await connection.execute(query, {"org": organization})
        return [(row.generation_id, row.cursor) for row in rows]


@contextlib.asynccontextmanager
async def _reading(settings: DatabaseSettings, *organizations: str) -> AsyncIterator[list[Reader]]:
    """Readers on a third engine (a third replica), polling until the block ends."""
    engine = create_engine(settings)
    readers = [Reader(engine, organization) for organization in organizations]
    tasks = [asyncio.create_task(reader.run()) for reader in readers]
    try:
        yield readers
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.dispose()


async def test_a_cursor_still_in_flight_is_never_skipped(database: DatabaseSettings) -> None:
    gate = Gate()
    async with (
        _replicas(database, gate.hold, None) as (first, second),
        _reading(database, "org-x") as (reader,),
    ):
        one = await first.generation("org-x")
        two = await second.generation("org-x")
        held = first.write(("org-x", one))
        await asyncio.wait_for(gate.numbered.wait(), 10)
        assert gate.taken == {"org-x": 1}  # the first transaction has its number, uncommitted

        racing = second.write(("org-x", two))

        async def committed_or_waiting() -> bool:
            return racing.done() or await _lock_waits(second.engine) > 0

        # The second replica commits, or waits for the first's counter row; either way
        # the reader reads what is visible now, before the first transaction commits.
        await assert_eventually(committed_or_waiting)
        await reader.another_round()
        gate.release.set()
        await asyncio.wait_for(asyncio.gather(held, racing), 10)
        await reader.another_round()

        assert reader.cursors == [1, 2]  # each number once, in order: none skipped
        assert await _stored(second.engine, "org-x") == [(one, 1), (two, 2)]


async def test_concurrent_replicas_number_each_organization_without_gap_or_repeat(
    database: DatabaseSettings,
) -> None:
    organizations = ("org-x", "org-y")
    async with (
        _replicas(database, None, None, None) as replicas,
        _reading(database, *organizations) as readers,
    ):
        generations = {
            (index, organization): await replica.generation(organization)
            for index, replica in enumerate(replicas)
            for organization in organizations
        }

        async def burst(index: int, replica: Replica, rounds: int) -> None:
            for n in range(rounds):
                # Batches name the organizations in both orders: no deadlock either way.
                order = organizations if (n + index) % 2 else organizations[::-1]
                targets = [(o, generations[(index, o)]) for o in order for _ in range(2)]
                writes = [replica.write(*targets) for _ in range(3)]  # batched together
                await asyncio.gather(*writes)

        await asyncio.gather(*(burst(i, r, 15) for i, r in enumerate(replicas)))
        for reader in readers:
            await reader.another_round()

        expected = len(replicas) * 15 * 3 * 2  # per organization
        for organization, reader in zip(organizations, readers, strict=True):
            stored = await _stored(replicas[0].engine, organization)
            assert [cursor for _, cursor in stored] == list(range(1, expected + 1))
            assert reader.cursors == list(range(1, expected + 1))
        committed = sum(r.writer.stats.transactions for r in replicas)
        assert committed < len(replicas) * (15 * 3 + 2)  # writes did share transactions


async def test_batches_naming_organizations_in_opposite_orders_do_not_deadlock(
    database: DatabaseSettings,
) -> None:
    gate = Gate()
    async with _replicas(database, gate.hold, None, None) as (first, second, third):
        x1, x2, x3 = [await r.generation("org-x") for r in (first, second, third)]
        y2, y3 = [await r.generation("org-y") for r in (second, third)]
        held = first.write(("org-x", x1))  # holds org-x's counter row
        await asyncio.wait_for(gate.numbered.wait(), 10)

        async def waiting(count: int) -> bool:
            return await _lock_waits(first.engine) >= count

        # The third waits for org-x first; then the second, naming org-y before org-x.
        # Were the rows locked in the order the batch names them, the second would hold
        # org-y while it waits, and the third, given org-x next, would wait for org-y:
        # a deadlock, and PostgreSQL would fail one of the two writes.
        xy = third.write(("org-x", x3), ("org-y", y3))
        await assert_eventually(lambda: waiting(1))
        yx = second.write(("org-y", y2), ("org-x", x2))
        await assert_eventually(lambda: waiting(2))
        gate.release.set()
        await asyncio.wait_for(asyncio.gather(held, xy, yx), 30)
        assert [c for _, c in await _stored(first.engine, "org-x")] == [1, 2, 3]
        assert [c for _, c in await _stored(first.engine, "org-y")] == [1, 2]
