"""A committed event whose publication is lost still reaches every watcher within one heartbeat.

The server runs with a bus that drops one publish on purpose, as a lost wake-up or a
bug would. Nothing else happens afterwards, so only the heartbeat's recheck of the
store can deliver the event.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_settings
from helpers import (
    CatalogStub,
    GenerationStub,
    assert_eventually,
    create_generation,
    create_product,
    wait_submitted,
)
from pg import fresh_database, requires_postgres
from watching import Stream

from sartiq_grpc.sartiq.generation.v1 import enums_pb2
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import DatabaseSettings
from server.domain.enums import EventKind
from server.domain.events import GenerationEvent
from server.store.events import EventBus

HEARTBEAT = 0.5


class DroppingBus(EventBus):
    """Loses the publish of the first committed write with an event ``drop`` picks."""

    def __init__(self, drop: Callable[[GenerationEvent], bool]) -> None:
        super().__init__()
        self._drop = drop
        self.dropped: list[GenerationEvent] = []
        self.dropped_at = 0.0

    def publish(self, events: Iterable[GenerationEvent]) -> None:
        events = list(events)
        if not self.dropped and any(self._drop(e) for e in events):
            self.dropped, self.dropped_at = events, time.monotonic()
            return
        super().publish(events)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=requires_postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'sartiq.db'}"
        return
    async with fresh_database() as url:
        yield url


def _is_progress(event: Any) -> bool:
    return bool(event.kind == enums_pb2.EVENT_KIND_TASK_PROGRESS)


async def test_a_dropped_publish_reaches_watchers_within_one_heartbeat(
    tmp_path: Path, database: str
) -> None:
    settings = make_settings(tmp_path, heartbeat_interval=HEARTBEAT).model_copy(
        update={"database": DatabaseSettings(url=database)}
    )
    bus = DroppingBus(lambda event: event.kind is EventKind.TASK_PROGRESS)
    fake = FakeComputeBackend(hold=True)
    async with (
        App(settings, compute=fake, bus=bus) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = GenerationStub(channel)
        generation_id = await create_generation(stub, await create_product(CatalogStub(channel)))
        await wait_submitted(fake, 1)
        one = Stream(stub.WatchGeneration(pb.WatchGenerationRequest(generation_id=generation_id)))
        every = Stream(stub.WatchGenerations(pb.WatchGenerationsRequest(after_cursor=0)))
        try:
            stored = 0

            async def caught_up() -> bool:
                # The task's submission is recorded and every event so far reached both
                # streams (read again: the workflow may still be recording it).
                nonlocal stored
                request = pb.GetGenerationRequest(generation_id=generation_id)
                generation = (await stub.GetGeneration(request)).generation
                stored = generation.last_event_sequence
                task = generation.predictions[0].tasks[0]
                running = task.status == enums_pb2.COMPUTE_TASK_STATUS_RUNNING
                recorded = bool(task.compute_task_id) and running
                return recorded and len(one.events()) == len(every.events()) == stored

            await assert_eventually(caught_up)  # both tail live events now
            fake.progress(next(iter(fake.tasks)), 0.5)

            async def delivered() -> bool:
                return bool(bus.dropped) and all(s.arrival(_is_progress) for s in (one, every))

            # The event was committed but never published: only a heartbeat finds it.
            await assert_eventually(delivered, timeout=10 * HEARTBEAT)
            for stream in (one, every):
                arrived = stream.arrival(_is_progress)
                assert arrived is not None
                # At most the heartbeat already on its way when the publish was lost
                # went out before the event did.
                assert stream.heartbeats_between(bus.dropped_at, arrived) <= 1
                assert arrived - bus.dropped_at < 2 * HEARTBEAT + 1.0
            assert [e.cursor for e in every.events()] == list(range(1, stored + 2))
            assert [e.sequence for e in one.events()] == list(range(1, stored + 2))
            assert one.events()[-1].task.progress == 0.5
        finally:
            await one.stop()
            await every.stop()


async def test_resuming_from_a_cursor_whose_publish_was_lost_is_accepted(
    tmp_path: Path, database: str
) -> None:
    # GetGeneration reads the store; a replica's recent log of the generation can lack
    # what another replica committed (or, here, a publish it lost). A client resuming
    # from what GetGeneration showed must not be told its cursor is beyond the end.
    settings = make_settings(tmp_path, heartbeat_interval=HEARTBEAT).model_copy(
        update={"database": DatabaseSettings(url=database)}
    )
    bus = DroppingBus(lambda event: event.kind is EventKind.TASK_PROGRESS)
    fake = FakeComputeBackend(hold=True)
    async with (
        App(settings, compute=fake, bus=bus) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = GenerationStub(channel)
        generation_id = await create_generation(stub, await create_product(CatalogStub(channel)))
        await wait_submitted(fake, 1)
        fake.progress(next(iter(fake.tasks)), 0.5)

        async def lost() -> bool:
            return bool(bus.dropped)

        await assert_eventually(lost)
        request = pb.GetGenerationRequest(generation_id=generation_id)
        last = (await stub.GetGeneration(request)).generation.last_event_sequence
        assert bus.dropped[-1].sequence == last
        rest = Stream(
            stub.WatchGeneration(
                pb.WatchGenerationRequest(generation_id=generation_id, after_sequence=last)
            )
        )
        try:
            await rest.call.wait_for_connection()
            fake.complete(next(iter(fake.tasks)))

            async def ended() -> bool:
                return rest.ended

            await assert_eventually(ended)
        finally:
            await rest.stop()
        events = rest.events()
        assert events[0].sequence == last + 1
        assert events[-1].terminal
