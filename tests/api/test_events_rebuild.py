"""The event log is enough to rebuild a generation exactly as GetGeneration shows it."""

from __future__ import annotations

import pytest
from helpers import (
    GenerationStub,
    assert_eventually,
    create_generation,
    wait_submitted,
    wait_terminal,
    watch_all,
)

from sartiq_grpc import replay
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2, resources_pb2
from server.compute.base import ComputeError
from server.compute.fake import FakeComputeBackend


async def _rebuilt(stub: GenerationStub, generation_id: str) -> resources_pb2.Generation | None:
    tree = None
    for event in await watch_all(stub, generation_id):
        tree = replay.apply(tree, event)
    return tree


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
