"""The local backend: real work off the event loop, progress, idempotency, cancellation."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any

import pytest
from PIL import Image

from server.compute.base import ComputeError, OutputFile, TaskRequest, UnknownComputeTaskError
from server.compute.local import Isolation, LocalComputeBackend
from server.compute.processors.tasks import default_registry
from server.compute.registry import (
    Processor,
    ProcessorContext,
    ProcessorError,
    ProcessorRegistry,
)
from server.domain.enums import TaskStatus, TaskType


def _no_inputs(uri: str) -> bytes:
    raise FileNotFoundError(uri)


def _png(size: tuple[int, int] = (4, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _backend_with(processor: Processor | None = None, **options: Any) -> LocalComputeBackend:
    """A one-worker backend: ``processor`` in a thread, or the real ones in a process if None.

    The closures of these tests coordinate with them through threading events, so they run
    in threads; tests/compute/test_local_processes.py tests the worker processes.
    """
    isolation: Isolation = "process"
    registry = default_registry()
    if processor is not None:
        registry, isolation = ProcessorRegistry({TaskType.GENERATION: processor}), "thread"
    return LocalComputeBackend(
        registry,
        resolve=_no_inputs,
        workers=1,
        max_input_pixels=10**7,
        isolation=isolation,
        **options,
    )


def _request(key: str, **params: Any) -> TaskRequest:
    base = {
        "width": 64,
        "height": 96,
        "seed": 1,
        "steps": 4,
        "prompt": "p",
        "shot_type": "full-body",
        "subject": None,
        "product": None,
        "style": None,
    }
    return TaskRequest(TaskType.GENERATION, {**base, **params}, key, "org")


async def test_generation_runs_off_the_loop_and_is_idempotent() -> None:
    backend = _backend_with()
    try:
        compute_id = await backend.submit(_request("k1"))
        assert await backend.submit(_request("k1")) == compute_id  # idempotent
        snaps = [snap async for snap in backend.watch(compute_id)]
        assert snaps[-1].status is TaskStatus.COMPLETED
        image = Image.open(io.BytesIO(snaps[-1].outputs[0].data))
        assert image.size == (64, 96)
    finally:
        await backend.aclose()


async def test_progress_is_reported_while_the_processor_runs() -> None:
    release = threading.Event()

    def stepped(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
        ctx.progress(0.5)
        release.wait(10)
        return [OutputFile(_png(), "image/png", 4, 4, seed=0)]

    backend = _backend_with(stepped)
    try:
        compute_id = await backend.submit(_request("k5"))
        seen = []
        async for snap in backend.watch(compute_id):
            seen.append((snap.status, snap.progress))
            if snap.progress == 0.5:
                release.set()
        assert (TaskStatus.RUNNING, 0.5) in seen
        assert seen[-1] == (TaskStatus.COMPLETED, 1.0)
    finally:
        release.set()
        await backend.aclose()


async def test_missing_reference_fails_with_validation() -> None:
    backend = _backend_with()
    try:
        product = {"name": "x", "images": ["artifact:" + "a" * 64], "weight": 1.0}
        compute_id = await backend.submit(_request("k2", product=product))
        snaps = [snap async for snap in backend.watch(compute_id)]
        assert snaps[-1].status is TaskStatus.FAILED
        assert snaps[-1].error_category == "validation"
    finally:
        await backend.aclose()


def _nothing(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    return []


async def test_unknown_ids_and_unsupported_types() -> None:
    backend = _backend_with(_nothing)  # registers GENERATION only
    try:
        with pytest.raises(UnknownComputeTaskError):
            async for _ in backend.watch("nope"):
                pass
        with pytest.raises(ComputeError) as caught:
            await backend.submit(TaskRequest(TaskType.VIDEO_GENERATION, {}, "k3", "org"))
        assert caught.value.category == "unsupported"
        assert "GENERATION" in caught.value.message
    finally:
        await backend.aclose()


async def test_cancel_stops_a_running_processor() -> None:
    started = threading.Event()
    release = threading.Event()

    def slow(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
        started.set()
        while not release.wait(0.01):
            ctx.progress(0.5)  # raises once the task is cancelled
        raise ProcessorError("internal", "not reached in this test")

    backend = _backend_with(slow)
    try:
        compute_id = await backend.submit(_request("k4"))
        await asyncio.to_thread(started.wait, 5)
        assert await backend.cancel(compute_id)
        snaps = [snap async for snap in backend.watch(compute_id)]
        assert snaps[-1].status is TaskStatus.CANCELLED
    finally:
        release.set()
        await backend.aclose()


def test_registry_refuses_duplicates() -> None:
    registry = default_registry()
    with pytest.raises(ValueError, match="registered already"):
        registry.register(TaskType.GENERATION, lambda params, ctx: [])


def _quick(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    return [OutputFile(_png(), "image/png", 4, 4, seed=0)]


async def _last(backend: LocalComputeBackend, compute_id: str) -> Any:
    return [s async for s in backend.watch(compute_id)][-1]


async def test_outputs_are_what_their_bytes_decode_to() -> None:
    def mislabelled(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
        return [OutputFile(_png((64, 48)), "image/jpeg", 1, 1, seed=7, notes=("n",))]

    backend = _backend_with(mislabelled)
    try:
        last = await _last(backend, await backend.submit(_request("m1")))
        assert last.status is TaskStatus.COMPLETED
        (output,) = last.outputs
        assert (output.mime_type, output.width, output.height) == ("image/png", 64, 48)
        assert (output.seed, output.notes) == (7, ("n",))
    finally:
        await backend.aclose()


@pytest.mark.parametrize("data", [b"png", _png()[:40], b""])
async def test_an_output_that_does_not_decode_fails_the_task(data: bytes) -> None:
    def broken(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
        return [OutputFile(data, "image/png", 4, 4, seed=0)]

    backend = _backend_with(broken)
    try:
        last = await _last(backend, await backend.submit(_request("b1")))
        assert last.status is TaskStatus.FAILED
        assert last.error_category == "internal"
        assert "does not decode" in (last.error_message or "")
        assert not last.outputs
        assert (backend.created, backend.ended) == (1, 1)
    finally:
        await backend.aclose()


async def test_finished_tasks_are_retained_up_to_a_bound() -> None:
    backend = _backend_with(_quick, retain_finished=2)
    try:
        ids = [await backend.submit(_request(f"r{i}")) for i in range(3)]
        for compute_id in ids[1:]:
            assert [s async for s in backend.watch(compute_id)][-1].status is TaskStatus.COMPLETED
        with pytest.raises(UnknownComputeTaskError):
            async for _ in backend.watch(ids[0]):
                pass
    finally:
        await backend.aclose()


async def test_a_queued_task_is_pending_and_cancels_without_running() -> None:
    started = threading.Event()
    release = threading.Event()
    runs: list[str] = []

    def blocking(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
        runs.append(params["prompt"])
        started.set()
        release.wait(10)
        return []

    backend = _backend_with(blocking)
    try:
        await backend.submit(_request("q1", prompt="first"))
        await asyncio.to_thread(started.wait, 5)
        queued = await backend.submit(_request("q2", prompt="second"))
        first_snapshot = await anext(aiter(backend.watch(queued)))
        assert first_snapshot.status is TaskStatus.PENDING
        cancelling = asyncio.create_task(backend.cancel(queued))
        release.set()
        assert await cancelling
        assert [s async for s in backend.watch(queued)][-1].status is TaskStatus.CANCELLED
        assert runs == ["first"]
    finally:
        release.set()
        await backend.aclose()
