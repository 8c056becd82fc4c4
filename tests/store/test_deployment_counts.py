"""Live counts of the whole deployment on PostgreSQL: kept by the writer, started by 0010."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from alembic import command
from helpers import assert_eventually
from pg import fresh_database, generation_row, requires_postgres
from sqlalchemy import text

from server.config import DatabaseSettings
from server.domain.errors import ResourceExhaustedError
from server.domain.limits import RetryDelay
from server.store.db import create_engine
from server.store.events import EventBus
from server.store.live_counts import LiveLimits
from server.store.migrate import alembic_config, upgrade_to_head
from server.store.rate_buckets import DatabaseTokenBuckets
from server.store.rows import GENERATIONS, Mode, Op
from server.store.writer import Writer

pytestmark = requires_postgres

LIVE = ("PENDING", "PROCESSING", "CANCELLING")
ENDED = ("COMPLETED", "PARTIALLY_COMPLETED", "FAILED", "CANCELLED")


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


def upsert(generation_id: str, organization: str, status: str) -> list[Op]:
    return [Op(GENERATIONS, Mode.UPSERT, generation_row(generation_id, organization, status))]


async def counts(url: str) -> dict[str, int]:
    """The stored counts: each organization's (non-zero) and the deployment's ("")."""
    engine = create_engine(DatabaseSettings(url=url))
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT organization, live FROM live_counts"))).all()
    finally:
        await engine.dispose()
    return {row.organization: row.live for row in rows if row.live or not row.organization}


@asynccontextmanager
async def writer(url: str, limits: LiveLimits) -> AsyncIterator[Writer]:
    """A replica's writer on the database at ``url`` (migrated to the head first)."""
    settings = DatabaseSettings(url=url)
    await upgrade_to_head(settings)
    engine = create_engine(settings)
    writing = Writer.for_async(engine, EventBus(16), lease_seconds=30.0, limits=limits)
    await writing.start()
    try:
        yield writing
    finally:
        await writing.shutdown()
        await engine.dispose()


async def test_a_refused_create_fails_alone_and_writes_nothing(pg_url: str) -> None:
    limits = LiveLimits(per_organization=2, total=100, retry_after=RetryDelay(3.0))
    async with writer(pg_url, limits) as w:
        # Queued together, so they share one transaction: a's third and fourth do not fit.
        queued = [
            w.submit(upsert(f"a{n}", "org-a", "PENDING"), [], admit="org-a") for n in range(4)
        ]
        queued.append(w.submit(upsert("b0", "org-b", "PENDING"), [], admit="org-b"))
        outcomes = await asyncio.gather(*queued, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, ResourceExhaustedError)]
        assert outcomes[:2] == [None, None]
        assert len(refused) == 2
        assert outcomes[4] is None  # org-b's create in the same batch was written
        assert {(e.reason, e.retry_after) for e in refused} == {("ORGANIZATION_LIMIT", 3.0)}
        assert w.stats.refused == 2
    engine = create_engine(DatabaseSettings(url=pg_url))
    try:
        async with engine.connect() as conn:
            stored = (await conn.execute(text("SELECT id FROM generations ORDER BY id"))).all()
    finally:
        await engine.dispose()
    assert [row.id for row in stored] == ["a0", "a1", "b0"]
    assert await counts(pg_url) == {"": 3, "org-a": 2, "org-b": 1}


async def test_ending_counts_once_even_when_written_again(pg_url: str) -> None:
    limits = LiveLimits(per_organization=5, total=5, retry_after=RetryDelay(1.0))
    async with writer(pg_url, limits) as w:
        for n in range(3, 5):
            await w.submit(upsert(f"g{n}", "org-a", "PENDING"), [], admit="org-a")
        assert await counts(pg_url) == {"": 2, "org-a": 2}
        await w.write(upsert("g3", "org-a", "PROCESSING"))
        assert await counts(pg_url) == {"": 2, "org-a": 2}
        await w.write(upsert("g3", "org-a", "COMPLETED"))
        assert await counts(pg_url) == {"": 1, "org-a": 1}
        # The same terminal state again (a retried write), then another terminal one.
        await w.write(upsert("g3", "org-a", "COMPLETED"))
        await w.write(upsert("g3", "org-a", "FAILED"))
        assert await counts(pg_url) == {"": 1, "org-a": 1}
        # Two endings of one generation in one batch count once too.
        await asyncio.gather(
            w.submit(upsert("g4", "org-a", "CANCELLED"), []),
            w.submit(upsert("g4", "org-a", "CANCELLED"), []),
        )
        assert await counts(pg_url) == {"": 0}


async def test_two_writers_never_pass_the_cap_together(pg_url: str) -> None:
    limits = LiveLimits(per_organization=10, total=15, retry_after=RetryDelay(1.0))
    async with writer(pg_url, limits) as one, writer(pg_url, limits) as two:
        # Twenty creates per organization, alternating replicas, one at a time per
        # replica so each is a transaction of its own racing the other replica's.
        async def creates(w: Writer, org: str, names: range) -> list[object]:
            results: list[object] = []
            for n in names:
                try:
                    await w.submit(upsert(f"{org}-{n}", org, "PENDING"), [], admit=org)
                    results.append(None)
                except ResourceExhaustedError as error:
                    results.append(error.reason)
            return results

        outcomes = await asyncio.gather(
            creates(one, "org-a", range(0, 20, 2)),
            creates(two, "org-a", range(1, 20, 2)),
            creates(one, "org-b", range(0, 20, 2)),
            creates(two, "org-b", range(1, 20, 2)),
        )
    flat = [o for each in outcomes for o in each]
    assert flat.count(None) == 15  # the deployment's bound
    a = outcomes[0] + outcomes[1]
    assert a.count(None) <= 10  # the organization's cap
    assert await counts(pg_url) == {
        "": 15,
        "org-a": a.count(None),
        "org-b": 15 - a.count(None),
    }


async def test_0010_counts_the_generations_live_at_the_upgrade(pg_url: str) -> None:
    settings = DatabaseSettings(url=pg_url)
    engine = create_engine(settings)
    statuses = {"org-a": [*LIVE, *ENDED, "PENDING"], "org-b": ["PROCESSING"], "org-c": [*ENDED]}
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), "0008"))
            for org, each in statuses.items():
                for n, status in enumerate(each):
                    await conn.execute(
                        GENERATIONS.insert(), generation_row(f"{org}-{n}", org, status)
                    )
    finally:
        await engine.dispose()
    await upgrade_to_head(settings)
    assert await counts(pg_url) == {"": 5, "org-a": 4, "org-b": 1}
    # And they go on from there: the next create of org-a meets its cap of 4.
    async with writer(
        pg_url, LiveLimits(per_organization=4, total=100, retry_after=RetryDelay(1.0))
    ) as w:
        with pytest.raises(ResourceExhaustedError):
            await w.submit(upsert("new", "org-a", "PENDING"), [], admit="org-a")
        await w.submit(upsert("new", "org-b", "PENDING"), [], admit="org-b")
    assert await counts(pg_url) == {"": 6, "org-a": 4, "org-b": 2}


async def test_replicas_share_a_bucket_that_refills_on_the_database_clock(pg_url: str) -> None:
    settings = DatabaseSettings(url=pg_url)
    await upgrade_to_head(settings)
    engines = [create_engine(settings), create_engine(settings)]
    try:
        one, two = (DatabaseTokenBuckets(engine, rate=10.0, burst=2) for engine in engines)
        assert await one.take("org-a") == 0.0
        assert await two.take("org-a") == 0.0
        wait = await one.take("org-a")  # the burst is spent, on both replicas together
        assert 0.0 < wait <= 0.1
        assert await two.take("org-b") == 0.0  # another organization's bucket is full

        async def granted() -> bool:
            return await two.take("org-a") == 0.0

        await assert_eventually(granted, timeout=5)  # a token came back after ~0.1 s
    finally:
        for engine in engines:
            await engine.dispose()
