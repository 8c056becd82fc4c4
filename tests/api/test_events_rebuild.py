"""The event log is enough to rebuild a generation exactly as GetGeneration shows it.

The rebuild goes by field presence, as the ``GenerationEvent`` comment says: a field an
event leaves unset is kept, a field it sets (even to an empty message) replaces. So the
server must never send an empty message where it means "unchanged".
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message
from helpers import (
    GenerationStub,
    assert_eventually,
    create_generation,
    create_product,
    generate_request,
    wait_submitted,
    wait_terminal,
    watch_all,
)

from sartiq_grpc import replay
from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2_grpc
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2, resources_pb2
from server.app import App
from server.compute.base import ComputeError
from server.compute.fake import FakeComputeBackend
from server.config import Settings
from server.evaluation.base import Evaluators
from server.evaluation.fake import ScriptedEvaluator

TASK_EVENTS = (enums_pb2.EVENT_KIND_TASK_CHANGED, enums_pb2.EVENT_KIND_TASK_PROGRESS)


async def _rebuilt(stub: GenerationStub, generation_id: str) -> resources_pb2.Generation | None:
    tree = None
    for event in await watch_all(stub, generation_id):
        tree = replay.apply(tree, event)
    return tree


def _empty_but_set(message: Message, path: str = "") -> Iterator[str]:
    """Paths of singular message fields that are set yet empty, anywhere in ``message``."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        name = f"{path}{field.name}"
        if field.message_type.GetOptions().map_entry:
            continue  # map values are scalars here
        if field.is_repeated:
            for index, item in enumerate(value):
                yield from _empty_but_set(item, f"{name}[{index}].")
        elif value.ByteSize() == 0:
            yield name
        else:
            yield from _empty_but_set(value, f"{name}.")


def _check_presence(events: list[resources_pb2.GenerationEvent]) -> None:
    """No event sends an empty message; a task's parameters only when they are new."""
    created = events[0].generation  # the whole tree, each task with its parameters
    sent = {t.id: t for p in created.predictions for t in p.tasks}
    assert all(t.HasField("parameters") for t in sent.values())
    for event in events:
        assert list(_empty_but_set(event)) == [], (event.sequence, event.kind)
        if event.kind not in TASK_EVENTS:
            continue
        task, before = event.task, sent.get(event.task.id)
        if before is None:
            assert task.HasField("parameters"), "a task's first event carries its parameters"
        elif task.HasField("parameters"):
            assert task.parameters != before.parameters, "parameters resent unchanged"
        if task.HasField("parameters"):
            sent[task.id] = task
        else:
            sent.setdefault(task.id, task)


async def _get(stub: GenerationStub, generation_id: str) -> resources_pb2.Generation:
    response = await stub.GetGeneration(
        generation_service_pb2.GetGenerationRequest(generation_id=generation_id)
    )
    return response.generation


async def test_replay_of_a_mixed_outcome_equals_get(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    generation_id = await create_generation(stub, product_id, batch=3)
    await wait_submitted(fake_compute, 3)
    first, second, _ = list(fake_compute.tasks)
    fake_compute.progress(first, 0.4)
    fake_compute.complete(first)
    fake_compute.fail(second, "validation", "prompt refused")

    async def two_settled() -> bool:
        counts = (await _get(stub, generation_id)).prediction_counts
        return (counts.completed_count, counts.error_count) == (1, 1)

    await assert_eventually(two_settled)
    await stub.CancelGeneration(
        generation_service_pb2.CancelGenerationRequest(generation_id=generation_id)
    )
    done = await wait_terminal(stub, generation_id)
    assert done.status == enums_pb2.GENERATION_STATUS_CANCELLED
    rebuilt = await _rebuilt(stub, generation_id)
    assert rebuilt == await _get(stub, generation_id)
    _check_presence(await watch_all(stub, generation_id))
    # What the equality covers: artifacts with recipes, task errors, times, done flags.
    by_status = {p.status: p for p in done.predictions}
    completed = by_status[enums_pb2.PREDICTION_STATUS_COMPLETED]
    assert completed.artifact.recipe.task_type == enums_pb2.COMPUTE_TASK_TYPE_GENERATION
    failed = by_status[enums_pb2.PREDICTION_STATUS_ERROR]
    assert failed.tasks[0].error.metadata["category"] == "validation"
    assert enums_pb2.PREDICTION_STATUS_CANCELLED in by_status
    assert all(p.done for p in done.predictions)


async def test_replay_after_a_lost_task_equals_get(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.submit_faults = [ComputeError("transient", "busy")]
    generation_id = await create_generation(stub, product_id, batch=2)
    await wait_terminal(stub, generation_id)
    assert await _rebuilt(stub, generation_id) == await _get(stub, generation_id)
    _check_presence(await watch_all(stub, generation_id))


async def test_replay_must_start_at_creation(stub: GenerationStub, product_id: str) -> None:
    generation_id = await create_generation(stub, product_id)
    await wait_terminal(stub, generation_id)
    events = await watch_all(stub, generation_id)
    with pytest.raises(ValueError, match="GENERATION_CREATED"):
        replay.apply(None, events[1])
    # Every intermediate state is a valid snapshot too: sequence numbers line up.
    tree = None
    for event in events:
        tree = replay.apply(tree, event)
        assert tree.last_event_sequence == event.sequence


async def test_an_agentic_log_rebuilds_by_presence(tmp_path: Path, settings: Settings) -> None:
    compute = FakeComputeBackend()
    evaluator = ScriptedEvaluator([0.2, 0.9])  # a retry with adjustments, then accepted
    async with (
        App(settings, compute=compute, evaluators=Evaluators({"local": evaluator})) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = GenerationStub(channel)
        product = await create_product(catalog_service_pb2_grpc.CatalogServiceStub(channel))
        request = generate_request(product)
        request.orchestration.type = enums_pb2.GENERATION_TYPE_AGENTIC
        request.orchestration.agentic.max_attempts = 2
        generation_id = (await stub.CreateGenerateGeneration(request)).generation.id
        done = await wait_terminal(stub, generation_id)
        assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED
        assert len(done.predictions[0].agentic.attempts) == 2
        events = await watch_all(stub, generation_id)
        assert {e.kind for e in events} >= {*TASK_EVENTS[:1], enums_pb2.EVENT_KIND_ATTEMPT_CHANGED}
        _check_presence(events)
        assert list(_empty_but_set(done)) == []  # Get follows the same rule
        assert await _rebuilt(stub, generation_id) == done


async def test_a_log_stored_by_an_earlier_release_is_sent_by_presence(
    tmp_path: Path, settings: Settings
) -> None:
    compute = FakeComputeBackend()
    async with (
        App(settings, compute=compute) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = GenerationStub(channel)
        product = await create_product(catalog_service_pb2_grpc.CatalogServiceStub(channel))
        generation_id = await create_generation(GenerationStub(channel), product, batch=2)
        expected = await wait_terminal(stub, generation_id)
    # Earlier releases stored "parameters unchanged" as an empty Struct.
    database = sqlite3.connect(tmp_path / "sartiq.db")
    rewritten = 0
    with database:
        query = "SELECT generation_id, sequence, payload_proto FROM generation_events"
        for key, sequence, payload in database.execute(query).fetchall():
            event = resources_pb2.GenerationEvent.FromString(payload)
            if event.HasField("task") and not event.task.HasField("parameters"):
                event.task.parameters.SetInParent()
                database.execute(
                    "UPDATE generation_events SET payload_proto = ?"
                    " WHERE generation_id = ? AND sequence = ?",
                    (event.SerializeToString(), key, sequence),
                )
                rewritten += 1
    database.close()
    assert rewritten > 0
    async with (
        App(settings, compute=compute) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = GenerationStub(channel)
        _check_presence(await watch_all(stub, generation_id))
        assert await _rebuilt(stub, generation_id) == expected


async def test_replay_goes_by_presence_not_emptiness(stub: GenerationStub, product_id: str) -> None:
    generation_id = await create_generation(stub, product_id)
    done = await wait_terminal(stub, generation_id)
    events = await watch_all(stub, generation_id)
    last_task_event = max(i for i, e in enumerate(events) if e.kind in TASK_EVENTS)
    # A task event that sets parameters replaces them, even with an empty Struct...
    emptied = resources_pb2.GenerationEvent()
    emptied.CopyFrom(events[last_task_event])
    emptied.task.parameters.SetInParent()
    tree = None
    for event in [*events[:last_task_event], emptied, *events[last_task_event + 1 :]]:
        tree = replay.apply(tree, event)
    assert tree is not None
    task = tree.predictions[0].tasks[0]
    assert task.HasField("parameters")
    assert not task.parameters.fields
    # ...and one that leaves them unset keeps them.
    assert done.predictions[0].tasks[0].parameters.fields
    assert not events[last_task_event].task.HasField("parameters")
    assert await _rebuilt(stub, generation_id) == done
