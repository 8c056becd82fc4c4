"""Three replica processes on one PostgreSQL database: every watcher gets every event live.

Every watcher, on every replica, gets every event of the organization once, in cursor
order. Each replica creates and runs generations of its own (a compute fake that completes at
once); streams on all three watch everything. The heartbeat is 30 s and the test ends
well before it, so only the wake-ups between replicas can deliver what others commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from helpers import CatalogStub, GenerationStub, assert_eventually, create_product, generate_request
from pg import fresh_database, requires_postgres
from procs import ServerProcess
from watching import Stream, percentile

from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb

pytestmark = requires_postgres
HEARTBEAT = 30.0
REPLICAS = 3
PER_REPLICA = 3


@pytest.fixture
async def replicas(tmp_path: Path) -> AsyncIterator[list[ServerProcess]]:
    async with fresh_database() as url:
        processes = [
            ServerProcess.with_fake_compute(
                tmp_path / f"replica-{n}",
                hold=False,
                DATABASE__URL=url,
                SERVER__HEARTBEAT_INTERVAL=str(HEARTBEAT),
            )
            for n in range(REPLICAS)
        ]
        for process in processes:
            process.workdir.mkdir()
        try:
            await asyncio.gather(*(p.start() for p in processes))
            yield processes
        finally:
            await asyncio.gather(*(p.stop() for p in processes))


async def test_every_watcher_on_every_replica_process_gets_every_event_once_live(
    replicas: list[ServerProcess],
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        channels = [
            await stack.enter_async_context(grpc.aio.insecure_channel(p.target)) for p in replicas
        ]
        stubs = [GenerationStub(c) for c in channels]
        product_id = await create_product(CatalogStub(channels[0]))
        everything = [
            Stream(s.WatchGenerations(pb.WatchGenerationsRequest(after_cursor=0))) for s in stubs
        ]
        for stream in everything:
            await stream.call.wait_for_connection()
        owners: dict[str, int] = {}
        for _ in range(PER_REPLICA):
            for n, stub in enumerate(stubs):
                created = await stub.CreateGenerateGeneration(generate_request(product_id))
                owners[created.generation.id] = n

        async def finished() -> bool:
            for generation_id in owners:
                request = pb.GetGenerationRequest(generation_id=generation_id)
                if not (await stubs[0].GetGeneration(request)).generation.done:
                    return False
            return True

        await assert_eventually(finished, timeout=20)
        total = 0
        for generation_id in owners:
            request = pb.GetGenerationRequest(generation_id=generation_id)
            total += (await stubs[0].GetGeneration(request)).generation.last_event_sequence

        async def all_arrived() -> bool:
            return all(len(s.events()) >= total for s in everything)

        await assert_eventually(all_arrived, timeout=HEARTBEAT / 2)
        for stream in everything:
            await stream.stop()
        # Each generation's log, read from a replica that did not run it.
        logs = {}
        for generation_id, owner in owners.items():
            call = stubs[(owner + 1) % REPLICAS].WatchGeneration(
                pb.WatchGenerationRequest(generation_id=generation_id)
            )
            logs[generation_id] = [item.event async for item in call if item.HasField("event")]

    wall_offset = time.time() - time.monotonic()
    remote: list[float] = []
    local: list[float] = []
    for n, stream in enumerate(everything):
        events = stream.events()
        assert [e.cursor for e in events] == list(range(1, total + 1))
        for generation_id, log in logs.items():
            assert [e for e in events if e.generation_id == generation_id] == log
        for arrived, item in stream.items:
            event = item.event
            if item.HasField("event"):
                made = event.event_time.ToDatetime(tzinfo=UTC).timestamp()
                mine = owners[event.generation_id] == n
                (local if mine else remote).append(arrived + wall_offset - made)
    assert sum(s.heartbeats() for s in everything) == 0
    assert max(remote) < HEARTBEAT / 3
    print(
        f"\n{REPLICAS} replica processes, {total} events; event time to delivery on the other "
        f"replicas ({len(remote)}): p50 {percentile(remote, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(remote, 0.99) * 1000:.0f} ms; on the replica that ran them "
        f"({len(local)}): p50 {percentile(local, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(local, 0.99) * 1000:.0f} ms ({datetime.now(UTC):%H:%M:%S})"
    )
