"""Claims, renewals, fencing and release of live generations on one PostgreSQL database.

Two replicas' writers and leases on a fresh database, driven directly: a claim takes what
nobody holds (or what a dead predecessor under the same name held), skips what another
replica is claiming, and raises the fencing number; a write of a generation another
replica has claimed since commits nothing and tells its engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pg import fresh_database, generation_row, requires_postgres
from sqlalchemy import text

from server.config import DatabaseSettings
from server.store.db import create_engine
from server.store.events import EventBus
from server.store.leases import LeaseLost, Leases
from server.store.migrate import upgrade_to_head
from server.store.rows import GENERATIONS, Mode, Op
from server.store.writer import Writer

pytestmark = requires_postgres


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        await upgrade_to_head(DatabaseSettings(url=url))
        yield url


class Replica:
    """A replica's leases and writer; ``lost`` collects what its engine would be told."""

    def __init__(self, leases: Leases, writer: Writer) -> None:
        self.leases = leases
        self.writer = writer
        self.lost: list[set[str]] = []
        writer.on_lost = self.lost.append

    def change(self, generation_id: str, status: str = "PROCESSING") -> asyncio.Future[None]:
        row = generation_row(generation_id, "org", status)
        row["owner"] = self.leases.name
        return self.writer.submit([Op(GENERATIONS, Mode.UPSERT, row)], [], generation=generation_id)

    def queue(self, generation_id: str, organization: str) -> asyncio.Future[None]:
        """Create a generation for the deployment's line (held by no replica)."""
        row = generation_row(generation_id, organization, "PENDING")
        return self.writer.submit([Op(GENERATIONS, Mode.UPSERT, row)], [], new=True)

    def create(self, generation_id: str) -> asyncio.Future[None]:
        row = generation_row(generation_id, "org", "PENDING")
        row["owner"] = self.leases.name
        return self.writer.submit(
            [Op(GENERATIONS, Mode.UPSERT, row)], [], generation=generation_id, new=True
        )


@asynccontextmanager
async def replica(url: str, name: str, lease: float = 30.0) -> AsyncIterator[Replica]:
    engine = create_engine(DatabaseSettings(url=url))
    leases = Leases(engine, name=name, lease_seconds=lease)
    writer = Writer.for_async(engine, EventBus(16), lease_seconds=lease, leases=leases)
    await writer.start()
    try:
        yield Replica(leases, writer)
    finally:
        await writer.shutdown()
        await engine.dispose()


async def stored(url: str, generation_id: str) -> Any:
    engine = create_engine(DatabaseSettings(url=url))
    try:
        async with engine.connect() as conn:
            query = text(
                "SELECT status, owner, fence, lease_expires_at - timezone('UTC', now()) AS left"
                " FROM generations WHERE id = :id"
            )
            return (await conn.execute(query, {"id": generation_id})).one()
    finally:
        await engine.dispose()


async def expire(url: str, *generation_ids: str) -> None:
    """Make the leases of these generations run out now (as a dead owner's would)."""
    engine = create_engine(DatabaseSettings(url=url))
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "UPDATE generations SET lease_expires_at = timezone('UTC', now())"
                    " - interval '1 second' WHERE id = ANY(:ids)"
                ),
                {"ids": list(generation_ids)},
            )
    finally:
        await engine.dispose()


async def test_a_new_generation_is_held_by_its_creator_on_the_database_clock(pg_url: str) -> None:
    async with replica(pg_url, "a", lease=20.0) as a:
        await a.create("g1")
        row = await stored(pg_url, "g1")
        assert (row.owner, row.fence) == ("a", 0)
        assert 19.0 < row.left.total_seconds() <= 20.0
        assert a.leases.held("g1") == 0
        await a.change("g1")  # its own later changes commit
        assert (await stored(pg_url, "g1")).status == "PROCESSING"


async def test_a_claimed_generation_is_fenced_against_its_old_owner(pg_url: str) -> None:
    async with replica(pg_url, "a") as a, replica(pg_url, "b") as b:
        await a.create("g1")
        await a.create("g2")
        assert await b.leases.claim(room=100) == []  # held, and the lease runs
        await expire(pg_url, "g1")
        claims = await b.leases.claim(room=100)
        assert [c.id for c in claims] == ["g1"]
        assert (await stored(pg_url, "g1")).fence == 1
        # a, paused past its lease, wakes up and writes: nothing of g1 commits.
        with pytest.raises(LeaseLost):
            await a.change("g1", "COMPLETED")
        assert a.lost == [{"g1"}]
        assert a.leases.held("g1") is None
        row = await stored(pg_url, "g1")
        assert (row.status, row.owner) == ("PENDING", "b")
        # Its other generation, in the same situation but not claimed, still commits.
        await a.change("g2")
        assert (await stored(pg_url, "g2")).status == "PROCESSING"
        await b.change("g1")
        assert (await stored(pg_url, "g1")).status == "PROCESSING"


async def test_a_lost_write_does_not_take_the_rest_of_its_batch_with_it(pg_url: str) -> None:
    async with replica(pg_url, "a") as a, replica(pg_url, "b") as b:
        for n in range(3):
            await a.create(f"g{n}")
        await expire(pg_url, "g1")
        await b.leases.claim(room=100)
        # Queued together: one transaction, then again without the lost write.
        outcomes = await asyncio.gather(
            *(a.change(f"g{n}") for n in range(3)), return_exceptions=True
        )
        assert [type(o).__name__ for o in outcomes] == ["NoneType", "LeaseLost", "NoneType"]
        assert [(await stored(pg_url, f"g{n}")).status for n in range(3)] == [
            "PROCESSING",
            "PENDING",
            "PROCESSING",
        ]


async def test_two_replicas_claiming_at_once_take_different_generations(pg_url: str) -> None:
    async with replica(pg_url, "dead") as dead:
        for n in range(40):
            await dead.create(f"g{n:02}")
    await expire(pg_url, *(f"g{n:02}" for n in range(40)))
    async with replica(pg_url, "a") as a, replica(pg_url, "b") as b:
        first, second = await asyncio.gather(a.leases.claim(room=100), b.leases.claim(room=100))
    taken = [c.id for c in first] + [c.id for c in second]
    assert sorted(taken) == [f"g{n:02}" for n in range(40)]  # each once, none left
    fences = {(await stored(pg_url, g)).fence for g in taken}
    assert fences == {1}


async def test_a_restarted_replica_claims_its_predecessors_generations_at_once(
    pg_url: str,
) -> None:
    async with replica(pg_url, "a") as a:
        await a.create("mine")
    async with replica(pg_url, "b") as b:
        await b.create("theirs")
    # The leases still run for 30 s: a replica under another name takes nothing, one
    # under the dead one's name takes what it held, and only that.
    async with replica(pg_url, "c") as c:
        assert await c.leases.claim(room=100, predecessor=True) == []
    async with replica(pg_url, "a") as again:
        claims = await again.leases.claim(room=100, predecessor=True)
        assert [c.id for c in claims] == ["mine"]
        assert (await stored(pg_url, "mine")).fence == 1
        await again.change("mine")


async def test_renewal_extends_the_leases_held_and_reports_those_lost(pg_url: str) -> None:
    async with replica(pg_url, "a", lease=5.0) as a, replica(pg_url, "b") as b:
        await a.create("kept")
        await a.create("taken")
        await expire(pg_url, "kept", "taken")
        await b.leases.claim(only="taken", room=1)
        assert await a.leases.renew() == {"taken"}
        row = await stored(pg_url, "kept")
        assert row.owner == "a"
        assert 4.0 < row.left.total_seconds() <= 5.0


async def test_an_ended_generation_is_neither_renewed_nor_reported_lost(pg_url: str) -> None:
    async with replica(pg_url, "a") as a:
        await a.create("g")
        await a.change("g", "COMPLETED")
        assert a.leases.held("g") is None
        assert await a.leases.renew() == set()


async def test_release_hands_the_generations_to_the_next_claim(pg_url: str) -> None:
    async with replica(pg_url, "a") as a, replica(pg_url, "b") as b:
        await a.create("g1")
        await a.create("g2")
        assert await a.leases.release() == 2
        claims = await b.leases.claim(room=100)
        assert [c.id for c in claims] == ["g1", "g2"]


async def test_a_recorded_cancel_reaches_the_owner(pg_url: str) -> None:
    async with replica(pg_url, "a") as a, replica(pg_url, "b") as b:
        await a.create("g1")
        await a.create("g2")
        assert await b.leases.request_cancel("org", "g1")
        assert not await b.leases.request_cancel("other-org", "g2")  # not another tenant's
        assert await a.leases.cancel_requests() == ["g1"]
        # Claimed by another later (a died), the request comes with the claim.
        await expire(pg_url, "g1")
        claims = await b.leases.claim(only="g1", room=1)
        assert [(c.id, c.cancel_requested) for c in claims] == [("g1", True)]


async def test_the_line_is_taken_organizations_in_turn_as_room_allows(pg_url: str) -> None:
    async with replica(pg_url, "a") as a, replica(pg_url, "b") as b:
        for n in range(3):
            await a.queue(f"x{n}", "x")  # a flood, first
        await a.queue("y0", "y")  # then one of another organization
        assert [await b.leases.queue_position(g) for g in ("x0", "y0", "x1", "x2")] == [
            1,
            2,
            3,
            4,
        ]
        claims = await b.leases.claim(room=2)
        assert [(c.id, c.waited) for c in claims] == [("x0", True), ("y0", True)]
        assert await b.leases.queue_position("x1") == 1
        assert await b.leases.queue_position("x0") == 0  # held now: not in the line
        assert [c.id for c in await a.leases.claim(room=0)] == []  # no room, nothing taken
        assert [c.id for c in await a.leases.claim(room=5)] == ["x1", "x2"]
