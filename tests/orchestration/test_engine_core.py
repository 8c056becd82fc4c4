"""The engine core's guarantees: group commits, cooperative stops, durable events, dedupe."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings
from google.protobuf import duration_pb2
from helpers import (
    GenerationStub,
    assert_eventually,
    create_generation,
    generate_request,
    wait_submitted,
    wait_terminal,
    watch_all,
)

from sartiq_grpc import replay
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import OrchestrationSettings, Settings
from server.orchestration.engine import Engine
from server.store import writer as writer_module


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    base = make_settings(tmp_path)
    limits = OrchestrationSettings(max_tasks_in_flight=1, progress_interval=0.2)
    return base.model_copy(update={"orchestration": limits})


async def test_a_one_image_generation_costs_two_writes(
    app: App, stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    before = app.writer_stats.writes
    await wait_terminal(stub, await create_generation(stub, product_id))
    # The create, then the result: attachment and completion share the second commit.
    assert app.writer_stats.writes - before == 2


async def test_progress_is_coalesced(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    generation_id = await create_generation(stub, product_id)
    await wait_submitted(fake_compute, 1)
    compute_id = next(iter(fake_compute.tasks))
    updates = 40
    for step in range(1, updates + 1):
        seen = fake_compute.snapshots_delivered
        fake_compute.progress(compute_id, step / (updates + 1))

        async def delivered(seen: int = seen) -> bool:
            return fake_compute.snapshots_delivered > seen

        await assert_eventually(delivered, interval=0.001)
    fake_compute.complete(compute_id)
    await wait_terminal(stub, generation_id)
    events = await watch_all(stub, generation_id)
    progress = [e for e in events if e.kind == enums_pb2.EVENT_KIND_TASK_PROGRESS]
    # 40 updates delivered to the workflow; at most one stored per 0.2 s.
    assert 1 <= len(progress) < updates / 4
    assert [e.task.progress for e in progress] == sorted(e.task.progress for e in progress)


async def test_cancel_while_queued_ends_at_once_and_submits_nothing(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    # One compute slot, so two workflows run: one holds the slot, one waits for it.
    running = await create_generation(stub, product_id)
    await wait_submitted(fake_compute, 1)
    next_in_line = await create_generation(stub, product_id)
    queued = [await create_generation(stub, product_id) for _ in range(3)]  # no workflow yet
    for generation_id in queued:
        await stub.CancelGeneration(
            generation_service_pb2.CancelGenerationRequest(generation_id=generation_id)
        )
    for generation_id in queued:
        # Closed while both running workflows still hold their places: not after them.
        done = await wait_terminal(stub, generation_id, timeout=5)
        assert done.status == enums_pb2.GENERATION_STATUS_CANCELLED
        task = done.predictions[0].tasks[0]
        assert task.status == enums_pb2.COMPUTE_TASK_STATUS_CANCELLED
        assert task.error.message == "never reached compute"
    assert len(fake_compute.submit_calls) == 1  # only the running one ever reached compute
    fake_compute.complete(next(iter(fake_compute.tasks)))
    assert (await wait_terminal(stub, running)).status == enums_pb2.GENERATION_STATUS_COMPLETED
    await wait_submitted(fake_compute, 2)
    fake_compute.complete(list(fake_compute.tasks)[1])
    assert (await wait_terminal(stub, next_in_line)).status == enums_pb2.GENERATION_STATUS_COMPLETED


async def test_a_cancel_during_a_slow_submit_still_releases_the_task(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    fake_compute.submit_gate = asyncio.Event()
    generation_id = await create_generation(stub, product_id)
    await wait_submitted(fake_compute, 1)  # accepted by compute, its answer not yet back
    await stub.CancelGeneration(
        generation_service_pb2.CancelGenerationRequest(generation_id=generation_id)
    )
    fake_compute.submit_gate.set()
    done = await wait_terminal(stub, generation_id)
    assert done.status == enums_pb2.GENERATION_STATUS_CANCELLED
    compute_id = next(iter(fake_compute.tasks))
    assert fake_compute.cancelled == [compute_id]
    task = done.predictions[0].tasks[0]
    assert task.compute_task_id == compute_id
    assert task.error.message == "compute confirmed release"


class Gate:
    """Holds every database write while closed: a commit that takes its time.

    It also notes each event handed to the writer, so a test can tell when the workflow
    has recorded something (the terminal event) even while its commit is held.
    """

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.opened.set()
        self.queued: list[Any] = []

    def close(self) -> None:
        self.opened.clear()

    def open(self) -> None:
        self.opened.set()

    async def terminal_queued(self) -> bool:
        return any(event.terminal for event in self.queued)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    held = Gate()
    write, submit = writer_module._SqliteBackend.write, writer_module.Writer.submit

    async def slow_write(self: Any, groups: Any, tally: Any, fences: Any) -> tuple[int, int]:
        await held.opened.wait()
        return await write(self, groups, tally, fences)

    def noting_submit(self: Any, ops: Any, events: Any, **kwargs: Any) -> Any:
        held.queued.extend(events)
        return submit(self, ops, events, **kwargs)

    monkeypatch.setattr(writer_module._SqliteBackend, "write", slow_write)
    monkeypatch.setattr(writer_module.Writer, "submit", noting_submit)
    yield held
    held.open()  # a failed test must not leave the server's shutdown waiting on it


async def _live_watch(stub: GenerationStub, generation_id: str) -> asyncio.Task[list[Any]]:
    call = stub.WatchGeneration(
        generation_service_pb2.WatchGenerationRequest(generation_id=generation_id)
    )
    stream = aiter(call)
    first = await anext(stream)  # the stream is open: later events reach it live

    async def rest() -> list[Any]:
        events = [first.event]
        events += [item.event async for item in stream if item.HasField("event")]
        return events

    return asyncio.create_task(rest())


async def test_a_cancel_landing_during_the_terminal_commit_answers_after_it(
    stub: GenerationStub,
    fake_compute: FakeComputeBackend,
    product_id: str,
    gate: Gate,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_compute.hold = True
    generation_id = await create_generation(stub, product_id)
    await wait_submitted(fake_compute, 1)
    watcher = await _live_watch(stub, generation_id)
    # A spy on the engine's cancel (the real one runs): when did it start, and end?
    entered, returned = asyncio.Event(), asyncio.Event()
    real_cancel = Engine.cancel

    async def spied(self: Engine, live: Any) -> Any:
        entered.set()
        try:
            return await real_cancel(self, live)
        finally:
            returned.set()

    monkeypatch.setattr(Engine, "cancel", spied)
    gate.close()  # the terminal commit is held here
    fake_compute.complete(next(iter(fake_compute.tasks)))
    await assert_eventually(gate.terminal_queued)
    cancel = asyncio.ensure_future(
        stub.CancelGeneration(
            generation_service_pb2.CancelGenerationRequest(generation_id=generation_id)
        )
    )
    await asyncio.wait_for(entered.wait(), 10)
    for _ in range(20):  # ample turns of the loop for a cancel that would not wait
        await asyncio.sleep(0)
    assert not returned.is_set(), "cancel answered before the terminal commit was durable"
    gate.open()
    answer = await asyncio.wait_for(cancel, 10)
    # It finished first: the cancel changes nothing and says so.
    assert answer.generation.status == enums_pb2.GENERATION_STATUS_COMPLETED
    events = await asyncio.wait_for(watcher, 10)
    assert events[-1].terminal
    done = await wait_terminal(stub, generation_id)
    assert answer.generation == done
    assert events[-1].sequence == done.last_event_sequence
    tree = None
    for event in await watch_all(stub, generation_id):
        tree = replay.apply(tree, event)
    assert tree == done


async def test_a_deadline_during_a_commit_ends_the_generation_and_watchers(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str, gate: Gate
) -> None:
    fake_compute.hold = True
    request = generate_request(product_id)
    request.timeout.CopyFrom(duration_pb2.Duration(seconds=1))
    generation_id = (await stub.CreateGenerateGeneration(request)).generation.id
    await wait_submitted(fake_compute, 1)
    watcher = await _live_watch(stub, generation_id)
    gate.close()  # the expiry's commit waits here while the deadline passes

    async def expired_in_memory() -> bool:
        return bool(fake_compute.cancelled)  # release is the first step of closing

    await assert_eventually(expired_in_memory)
    gate.open()
    events = await asyncio.wait_for(watcher, 10)
    assert events[-1].terminal
    assert events[-1].generation.error.reason == "DEADLINE_EXCEEDED"


async def test_concurrent_creates_with_one_request_id_make_one_generation(
    stub: GenerationStub, product_id: str
) -> None:
    request = generate_request(product_id)
    request.request_id = "same-key"
    answers = await asyncio.gather(*(stub.CreateGenerateGeneration(request) for _ in range(20)))
    assert len({a.generation.id for a in answers}) == 1
    listed = await stub.ListGenerations(generation_service_pb2.ListGenerationsRequest())
    assert len(listed.generations) == 1


async def _org_events(
    stub: GenerationStub, request: generation_service_pb2.WatchGenerationsRequest, count: int
) -> list[Any]:
    events: list[Any] = []
    call = stub.WatchGenerations(request)
    async for item in call:
        if item.HasField("event"):
            events.append(item.event)
            if len(events) == count:
                break
    call.cancel()
    return events


async def test_watch_generations_filters_orders_and_resumes(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    labelled = generate_request(product_id)
    labelled.labels["team"] = "red"
    first = (await stub.CreateGenerateGeneration(labelled)).generation.id
    other = await create_generation(stub, product_id)  # no label: filtered out
    await wait_terminal(stub, first)
    await wait_terminal(stub, other)
    flt = generation_service_pb2.GenerationFilter(labels={"team": "red"})
    first_log = await watch_all(stub, first)
    replayed = await _org_events(
        stub,
        generation_service_pb2.WatchGenerationsRequest(filter=flt, after_cursor=0),
        len(first_log),
    )
    assert [e.generation_id for e in replayed] == [first] * len(first_log)
    assert [e.sequence for e in replayed] == [e.sequence for e in first_log]
    cursors = [e.cursor for e in replayed]
    assert cursors == sorted(cursors)
    assert len(set(cursors)) == len(cursors)
    # Resume from the middle: exactly the rest, then live events of a new generation,
    # created only once the replayed part has arrived (so the tail is the live path).
    call = stub.WatchGenerations(
        generation_service_pb2.WatchGenerationsRequest(filter=flt, after_cursor=cursors[2])
    )
    stream = aiter(call)
    resumed: list[Any] = []
    while len(resumed) < len(first_log) - 3:
        item = await asyncio.wait_for(anext(stream), 10)
        if item.HasField("event"):
            resumed.append(item.event)
    fake_compute.hold = True
    second = (await stub.CreateGenerateGeneration(labelled)).generation.id
    while len(resumed) < len(first_log) - 3 + 2:
        item = await asyncio.wait_for(anext(stream), 10)
        if item.HasField("event"):
            resumed.append(item.event)
    call.cancel()
    assert [e.cursor for e in resumed[: len(first_log) - 3]] == cursors[3:]
    assert [e.generation_id for e in resumed[len(first_log) - 3 :]] == [second, second]
    assert [e.sequence for e in resumed[len(first_log) - 3 :]] == [1, 2]
