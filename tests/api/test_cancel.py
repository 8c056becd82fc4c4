"""CancelGeneration: every non-terminal state, propagation to compute, no-op when finished."""

from __future__ import annotations

from helpers import (
    GenerationStub,
    create_generation,
    wait_submitted,
    wait_terminal,
)

from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2, resources_pb2
from server.compute.fake import FakeComputeBackend


async def cancel(stub: GenerationStub, generation_id: str) -> resources_pb2.Generation:
    response = await stub.CancelGeneration(
        generation_service_pb2.CancelGenerationRequest(generation_id=generation_id)
    )
    return response.generation


async def test_cancel_running_generation_releases_compute(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    generation_id = await create_generation(stub, product_id, batch=2)
    await wait_submitted(fake_compute, 2)
    await cancel(stub, generation_id)
    done = await wait_terminal(stub, generation_id)

    assert done.status == enums_pb2.GENERATION_STATUS_CANCELLED
    assert done.error.reason == "CANCELLED"
    assert {p.status for p in done.predictions} == {enums_pb2.PREDICTION_STATUS_CANCELLED}
    for prediction in done.predictions:
        task = prediction.tasks[0]
        assert task.status == enums_pb2.COMPUTE_TASK_STATUS_CANCELLED
        assert task.error.message == "compute confirmed release"
    assert sorted(fake_compute.cancelled) == sorted(fake_compute.tasks)


async def test_cancel_is_recorded_as_events(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    generation_id = await create_generation(stub, product_id)
    await cancel(stub, generation_id)
    await wait_terminal(stub, generation_id)
    statuses = []
    call = stub.WatchGeneration(
        generation_service_pb2.WatchGenerationRequest(generation_id=generation_id)
    )
    async for item in call:
        if item.event.kind == enums_pb2.EVENT_KIND_GENERATION_CHANGED:
            statuses.append(item.event.generation.status)
    assert statuses[-2:] == [
        enums_pb2.GENERATION_STATUS_CANCELLING,
        enums_pb2.GENERATION_STATUS_CANCELLED,
    ]


async def test_cancel_of_finished_generation_is_a_no_op(
    stub: GenerationStub, product_id: str
) -> None:
    generation_id = await create_generation(stub, product_id)
    done = await wait_terminal(stub, generation_id)
    again = await cancel(stub, generation_id)
    assert again.status == enums_pb2.GENERATION_STATUS_COMPLETED
    assert again.last_event_sequence == done.last_event_sequence
