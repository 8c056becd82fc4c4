"""WatchGeneration: replay, live tail, gap-free sequences, the terminal close, heartbeats."""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
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
    wait_terminal,
)

from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2, resources_pb2
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import Settings


async def collect(
    stub: GenerationStub, generation_id: str, after: int = 0
) -> list[resources_pb2.GenerationEvent]:
    events = []
    call = stub.WatchGeneration(
        generation_service_pb2.WatchGenerationRequest(
            generation_id=generation_id, after_sequence=after
        )
    )
    async for item in call:
        if item.HasField("event"):
            events.append(item.event)
    return events


async def test_late_subscriber_gets_full_replay_and_close(
    stub: GenerationStub, product_id: str
) -> None:
    generation_id = await create_generation(stub, product_id, batch=2)
    done = await wait_terminal(stub, generation_id)
    events = await collect(stub, generation_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].terminal
    assert sum(e.terminal for e in events) == 1
    assert events[-1].generation.status == enums_pb2.GENERATION_STATUS_COMPLETED
    assert events[-1].sequence == done.last_event_sequence
    assert events[0].kind == enums_pb2.EVENT_KIND_GENERATION_CREATED
    assert events[0].generation.status == enums_pb2.GENERATION_STATUS_PENDING
    completed = [e for e in events if e.prediction.status == enums_pb2.PREDICTION_STATUS_COMPLETED]
    assert len(completed) == 2
    assert all(e.prediction.artifact.sha256 for e in completed)


async def test_live_watch_sees_progress_and_ends_after_terminal(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    generation_id = await create_generation(stub, product_id)
    call = stub.WatchGeneration(
        generation_service_pb2.WatchGenerationRequest(generation_id=generation_id)
    )
    seen: list[resources_pb2.GenerationEvent] = []

    async def reader() -> None:
        async for item in call:
            if item.HasField("event"):
                seen.append(item.event)

    task = asyncio.create_task(reader())
    try:
        await wait_submitted(fake_compute, 1)
        compute_id = next(iter(fake_compute.tasks))
        for value in (0.25, 0.5, 0.75):
            fake_compute.progress(compute_id, value)
            await assert_eventually(functools.partial(_saw_progress, seen, value))
        fake_compute.complete(compute_id)
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert [e.sequence for e in seen] == list(range(1, len(seen) + 1))
    progress = [e.task.progress for e in seen if e.kind == enums_pb2.EVENT_KIND_TASK_PROGRESS]
    assert progress == [0.25, 0.5, 0.75]
    assert seen[-1].terminal


async def _saw_progress(seen: list[resources_pb2.GenerationEvent], value: float) -> bool:
    return any(e.task.progress == value for e in seen)


async def test_resume_after_cursor_has_no_gap_or_duplicate(
    stub: GenerationStub, product_id: str
) -> None:
    generation_id = await create_generation(stub, product_id, batch=3)
    await wait_terminal(stub, generation_id)
    everything = await collect(stub, generation_id)
    tail = await collect(stub, generation_id, after=4)
    assert [e.sequence for e in tail] == [e.sequence for e in everything[4:]]
    assert await collect(stub, generation_id, after=everything[-1].sequence) == []


async def test_cursor_beyond_the_end_is_invalid(stub: GenerationStub, product_id: str) -> None:
    generation_id = await create_generation(stub, product_id)
    await wait_terminal(stub, generation_id)
    for bad in (-1, 10_000):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(stub, generation_id, after=bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_generation_is_not_found(stub: GenerationStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub, str(uuid.uuid4()))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, heartbeat_interval=0.05)


async def test_idle_stream_gets_heartbeats(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    generation_id = await create_generation(stub, product_id)
    call = stub.WatchGeneration(
        generation_service_pb2.WatchGenerationRequest(generation_id=generation_id)
    )
    heartbeats = 0
    async for item in call:
        if item.HasField("heartbeat"):
            heartbeats += 1
            if heartbeats == 2:
                break
    call.cancel()
    assert heartbeats == 2


async def test_many_watchers_all_see_the_same_events(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    results = await _complete_under_watchers(stub, fake_compute, product_id, 2, watchers=20)
    sequences = [[e.sequence for e in r] for r in results]
    assert all(s == sequences[0] for s in sequences)
    assert sequences[0] == list(range(1, len(sequences[0]) + 1))


async def test_watchers_that_fall_behind_resume_from_the_store(
    tmp_path: Path, fake_compute: FakeComputeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="server.orchestration.watch")
    settings = make_settings(tmp_path, watch_buffer=1)
    async with (
        App(settings, compute=fake_compute) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = GenerationStub(channel)
        catalog = CatalogStub(channel)
        product_id = await create_product(catalog, "p", colour=(1, 1, 1))
        results = await _complete_under_watchers(stub, fake_compute, product_id, 4, watchers=5)
    assert "fell behind" in caplog.text
    for events in results:
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[-1].terminal


async def _complete_under_watchers(
    stub: GenerationStub, fake: FakeComputeBackend, product_id: str, batch: int, *, watchers: int
) -> list[list[resources_pb2.GenerationEvent]]:
    """Hold a generation's tasks, attach ``watchers`` streams, then complete every task."""
    fake.hold = True
    generation_id = await create_generation(stub, product_id, batch=batch)
    await wait_submitted(fake, batch)
    streams = [
        stub.WatchGeneration(
            generation_service_pb2.WatchGenerationRequest(generation_id=generation_id)
        )
        for _ in range(watchers)
    ]
    # Every watcher has its first event, so each is tailing live events when the burst of
    # completions arrives.
    firsts = [await stream.read() for stream in streams]

    async def rest(stream: Any, first: Any) -> list[resources_pb2.GenerationEvent]:
        events = [first.event]
        while (item := await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            if item.HasField("event"):
                events.append(item.event)
        return events

    calls = [asyncio.create_task(rest(s, f)) for s, f in zip(streams, firsts, strict=True)]
    for compute_id in list(fake.tasks):
        fake.complete(compute_id)
    return list(await asyncio.wait_for(asyncio.gather(*calls), 10))
