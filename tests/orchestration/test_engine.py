"""The engine through the public API: failures, retries, deadlines, admission and recovery."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from conftest import make_settings
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2
from helpers import (
    CatalogStub,
    GenerationStub,
    assert_eventually,
    create_generation,
    create_product,
    generate_request,
    rich_status,
    wait_submitted,
    wait_terminal,
    watch_all,
)

from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2
from server.app import App
from server.compute.base import ComputeError
from server.compute.fake import FakeComputeBackend
from server.config import OrchestrationSettings, Settings


async def test_compute_failure_fails_the_generation_with_its_category(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.fail_with = ("validation", "prompt rejected")
    done = await wait_terminal(stub, await create_generation(stub, product_id))
    assert done.status == enums_pb2.GENERATION_STATUS_FAILED
    assert done.error.reason == "NO_PREDICTION_COMPLETED"
    assert done.error.message == "prompt rejected"
    task = done.predictions[0].tasks[0]
    assert task.status == enums_pb2.COMPUTE_TASK_STATUS_FAILED
    assert task.error.metadata["category"] == "validation"
    assert task.error.message == "prompt rejected"
    assert task.error.reason == "COMPUTE_FAILED"
    assert task.error.code == code_pb2.INVALID_ARGUMENT
    assert task.error.domain == "generation.sartiq"
    assert done.error.code == code_pb2.INVALID_ARGUMENT  # the first failure's code


async def test_one_of_two_failing_is_partially_completed(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    generation_id = await create_generation(stub, product_id, batch=2)
    await wait_submitted(fake_compute, 2)
    first, second = list(fake_compute.tasks)
    fake_compute.complete(first)
    fake_compute.fail(second, "internal", "gpu fell over")
    done = await wait_terminal(stub, generation_id)
    assert done.status == enums_pb2.GENERATION_STATUS_PARTIALLY_COMPLETED
    assert done.prediction_counts.completed_count == 1
    assert done.prediction_counts.error_count == 1


async def test_transient_submit_errors_are_retried(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.submit_faults = [ComputeError("transient", "connection refused")] * 2
    done = await wait_terminal(stub, await create_generation(stub, product_id))
    assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED
    assert len(fake_compute.submitted) == 1


async def test_permanent_submit_error_fails_at_once(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.submit_faults = [ComputeError("unsupported", "no such task type")]
    done = await wait_terminal(stub, await create_generation(stub, product_id))
    assert done.status == enums_pb2.GENERATION_STATUS_FAILED
    assert done.predictions[0].tasks[0].error.metadata["category"] == "unsupported"
    assert fake_compute.submitted == []


async def test_deadline_fails_the_generation_and_releases_compute(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    request = generate_request(product_id)
    request.timeout.CopyFrom(duration_pb2.Duration(seconds=1))
    created = (await stub.CreateGenerateGeneration(request)).generation
    assert created.HasField("deadline_time")
    done = await wait_terminal(stub, created.id)
    assert done.status == enums_pb2.GENERATION_STATUS_FAILED
    assert done.error.reason == "DEADLINE_EXCEEDED"
    assert done.predictions[0].status == enums_pb2.PREDICTION_STATUS_ERROR
    assert fake_compute.cancelled == list(fake_compute.tasks)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    base = make_settings(tmp_path)
    limits = OrchestrationSettings(max_queued_generations=1, retry_after_seconds=3.0)
    return base.model_copy(update={"orchestration": limits})


async def test_admission_limit_answers_resource_exhausted_with_retry_info(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    await create_generation(stub, product_id)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create_generation(stub, product_id)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = [
        d for d in rich_status(caught.value).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
    ]
    info = error_details_pb2.RetryInfo()
    retry[0].Unpack(info)
    assert 1.5 <= info.retry_delay.ToTimedelta().total_seconds() <= 4.5  # 3 s +/- 50%


async def test_callers_refused_together_are_told_delays_spread_around_the_setting(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    await create_generation(stub, product_id)
    refusals = await asyncio.gather(
        *(create_generation(stub, product_id) for _ in range(20)), return_exceptions=True
    )
    delays = []
    for refusal in refusals:
        assert isinstance(refusal, grpc.aio.AioRpcError)
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        (packed,) = [
            d for d in rich_status(refusal).details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
        ]
        info = error_details_pb2.RetryInfo()
        packed.Unpack(info)
        delays.append(info.retry_delay.ToTimedelta().total_seconds())
    assert all(1.5 <= delay <= 4.5 for delay in delays), delays
    # Drawn per refusal: twenty equal draws of a millisecond delay do not happen.
    assert len(set(delays)) > 10, delays


async def _start_and_stop_midway(
    settings: Settings, compute: FakeComputeBackend
) -> tuple[str, list[str]]:
    compute.hold = True
    async with (
        App(settings, compute=compute) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = GenerationStub(channel)
        product_id = await create_product(CatalogStub(channel), colour=(0, 0, 200))
        generation_id = await create_generation(stub, product_id, batch=2)

        async def attached() -> bool:
            got = await stub.GetGeneration(
                generation_service_pb2.GetGenerationRequest(generation_id=generation_id)
            )
            return all(p.tasks[0].compute_task_id for p in got.generation.predictions)

        await assert_eventually(attached)
        got = await stub.GetGeneration(
            generation_service_pb2.GetGenerationRequest(generation_id=generation_id)
        )
        task_ids = sorted(p.tasks[0].id for p in got.generation.predictions)
    return generation_id, task_ids


async def test_restart_reattaches_without_submitting_twice(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    compute = FakeComputeBackend()
    generation_id, task_ids = await _start_and_stop_midway(settings, compute)
    assert sorted(r.idempotency_key for r in compute.submitted) == task_ids
    assert {r.organization for r in compute.submitted} == {"default"}
    async with (
        App(settings, compute=compute) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = GenerationStub(channel)
        for compute_id in list(compute.tasks):
            compute.complete(compute_id)
        done = await wait_terminal(stub, generation_id)
    assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED
    # Re-attached by the stored compute ids: not one submit call after the restart.
    assert len(compute.submit_calls) == 2
    assert all(p.tasks[0].attempt == 1 for p in done.predictions)


async def test_restart_resubmits_tasks_the_compute_server_lost(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    first = FakeComputeBackend()
    generation_id, task_ids = await _start_and_stop_midway(settings, first)
    lost = {task.request.idempotency_key: compute_id for compute_id, task in first.tasks.items()}
    fresh = FakeComputeBackend()  # knows none of them, as a restarted local backend
    async with (
        App(settings, compute=fresh) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = GenerationStub(channel)
        done = await wait_terminal(stub, generation_id)
        events = await watch_all(stub, generation_id)
    assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED
    assert sorted(r.idempotency_key for r in fresh.submit_calls) == task_ids
    assert done.prediction_counts.completed_count == 2
    # The record says the work ran twice: a second attempt, both compute ids kept.
    for prediction in done.predictions:
        task = prediction.tasks[0]
        assert task.attempt == 2
        assert list(task.previous_compute_task_ids) == [lost[task.id]]
        assert task.compute_task_id in fresh.tasks
    notes = [e for e in events if e.note]
    assert sorted(n.task.id for n in notes) == task_ids
    for note in notes:
        assert note.task.attempt == 2
        assert "no longer knows task" in note.note
        assert list(note.task.previous_compute_task_ids) == [lost[note.task.id]]


async def test_unexpected_error_fails_the_generation_without_leaking_it(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.submit_faults = [RuntimeError("secret internal detail")]
    done = await wait_terminal(stub, await create_generation(stub, product_id))
    assert done.status == enums_pb2.GENERATION_STATUS_FAILED
    assert done.error.reason == "INTERNAL"
    assert "secret" not in done.error.message


async def test_cancel_interrupted_by_shutdown_is_finished_by_the_next_start(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path)
    compute = FakeComputeBackend()
    generation_id, _ = await _start_and_stop_midway(settings, compute)
    compute.cancel_gate = asyncio.Event()  # the compute server is slow to release
    async with (
        App(settings, compute=compute) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = GenerationStub(channel)
        response = await stub.CancelGeneration(
            generation_service_pb2.CancelGenerationRequest(generation_id=generation_id)
        )
        assert response.generation.status == enums_pb2.GENERATION_STATUS_CANCELLING
    # Shut down while the release was pending: the next start still sees CANCELLING
    # and finishes the cancellation once compute answers.
    async with (
        App(settings, compute=compute) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = GenerationStub(channel)
        got = await stub.GetGeneration(
            generation_service_pb2.GetGenerationRequest(generation_id=generation_id)
        )
        assert got.generation.status == enums_pb2.GENERATION_STATUS_CANCELLING
        compute.cancel_gate.set()
        done = await wait_terminal(stub, generation_id)
    assert done.status == enums_pb2.GENERATION_STATUS_CANCELLED
    assert sorted(compute.cancelled) == sorted(compute.tasks)
