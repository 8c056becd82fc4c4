"""The ComputeBackend contract, one suite for every backend: local, fake and http.

The http backend talks to the project's compute server in its own process.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from conftest import COMPUTE_TOKEN
from PIL import Image

from server.compute.base import (
    ComputeBackend,
    ComputeError,
    TaskRequest,
    TaskSnapshot,
    UnknownComputeTaskError,
)
from server.compute.fake import FakeComputeBackend
from server.compute.http import HttpComputeBackend
from server.compute.local import LocalComputeBackend
from server.compute.processors.tasks import SEED_FREE, default_registry
from server.domain.enums import ComputeErrorCategory, TaskStatus, TaskType
from server.domain.states import TASK_TERMINAL

_keys = itertools.count()


def _png(size: tuple[int, int] = (48, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 120, 150)).save(buffer, format="PNG")
    return buffer.getvalue()


def _textured() -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((112, 80)).save(buffer, format="PNG")
    return buffer.getvalue()


TEXTURED = "artifact:" + "3" * 64
INPUTS = {"artifact:" + "1" * 64: _png(), TEXTURED: _textured()}


def _resolve(reference: str) -> bytes:
    try:
        return INPUTS[reference]
    except KeyError:
        raise FileNotFoundError(reference) from None


def _request(**params: Any) -> TaskRequest:
    base = {"base_image": "artifact:" + "1" * 64, "brightness": 0.2, "seed": 1}
    return TaskRequest(
        task_type=TaskType.IMAGE_ADJUSTER,
        params={**base, **params},
        idempotency_key=f"contract-{next(_keys)}",
        organization="default",
    )


@pytest.fixture(params=["local", "fake", "http"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[ComputeBackend]:
    chosen: ComputeBackend
    if request.param == "local":
        chosen = LocalComputeBackend(
            default_registry(), resolve=_resolve, workers=1, max_input_pixels=10**7
        )
    elif request.param == "fake":
        chosen = FakeComputeBackend()
    else:
        url = request.getfixturevalue("compute_server")
        chosen = HttpComputeBackend(url, resolve=_resolve, token=COMPUTE_TOKEN)
    yield chosen
    await chosen.aclose()


async def _last(backend: ComputeBackend, compute_id: str) -> TaskSnapshot:
    last = None
    async for snap in backend.watch(compute_id):
        last = snap
    assert last is not None
    return last


async def test_a_task_runs_to_completion_with_its_output(backend: ComputeBackend) -> None:
    compute_id = await backend.submit(_request())
    seen = [snap async for snap in backend.watch(compute_id)]
    assert seen[-1].status is TaskStatus.COMPLETED
    assert all(snap.status not in TASK_TERMINAL for snap in seen[:-1])
    (output,) = seen[-1].outputs
    with Image.open(io.BytesIO(output.data)) as image:
        assert image.size == (output.width, output.height)
    assert output.mime_type == "image/png"


async def test_the_same_idempotency_key_is_the_same_task(backend: ComputeBackend) -> None:
    request = _request()
    first = await backend.submit(request)
    assert await backend.submit(request) == first
    assert (await _last(backend, first)).status is TaskStatus.COMPLETED


async def test_an_unknown_task_is_unknown(backend: ComputeBackend) -> None:
    with pytest.raises(UnknownComputeTaskError):
        await _last(backend, "no-such-task")


async def test_cancel_is_idempotent_and_confirms(backend: ComputeBackend) -> None:
    compute_id = await backend.submit(_request())
    await _last(backend, compute_id)
    assert await backend.cancel(compute_id) is True
    assert await backend.cancel(compute_id) is True


def _real_backend(kind: str, request: pytest.FixtureRequest) -> ComputeBackend:
    """A backend that runs the real processors: in this process, or the compute server's."""
    if kind == "local":
        return LocalComputeBackend(
            default_registry(), resolve=_resolve, workers=1, max_input_pixels=10**7
        )
    url = request.getfixturevalue("compute_server")
    return HttpComputeBackend(url, resolve=_resolve, token=COMPUTE_TOKEN)


@pytest.mark.parametrize("kind", ["local", "http"])
async def test_bad_parameters_fail_the_task_as_validation(
    kind: str, request: pytest.FixtureRequest
) -> None:
    backend = _real_backend(kind, request)
    try:
        last = await _last(backend, await backend.submit(_request(brightness=5.0)))
        assert last.status is TaskStatus.FAILED
        assert last.error_category == ComputeErrorCategory.VALIDATION
        assert "brightness" in (last.error_message or "")
    finally:
        await backend.aclose()


async def test_an_input_that_is_not_stored_is_refused(compute_server: str) -> None:
    backend = HttpComputeBackend(compute_server, resolve=_resolve, token=COMPUTE_TOKEN)
    try:
        with pytest.raises(ComputeError) as caught:
            await backend.submit(_request(base_image="artifact:" + "2" * 64))
        assert caught.value.category is ComputeErrorCategory.VALIDATION
    finally:
        await backend.aclose()


async def test_a_wrong_token_is_a_permanent_error(compute_server: str) -> None:
    backend = HttpComputeBackend(compute_server, resolve=_resolve, token="wrong")
    try:
        with pytest.raises(ComputeError) as caught:
            await backend.submit(_request())
        assert caught.value.category is ComputeErrorCategory.INTERNAL
        assert not caught.value.transient
        assert "refused this service" in caught.value.message
    finally:
        await backend.aclose()


SEED_CHECKS: dict[TaskType, dict[str, Any]] = {
    TaskType.IMAGE_ADJUSTER: {"brightness": 0.2, "gamma": 1.3},
    TaskType.DETAIL_ENHANCER: {"strength": 0.7},
    TaskType.REFINE: {"upscale_enabled": True, "upscale_factor": 1.5},
    TaskType.FACE_ENHANCER: {"strength": 0.5},
    TaskType.BACKGROUND_FIX: {"background_prompt": "white studio"},  # reads its seed
}


@pytest.mark.parametrize("kind", ["local", "http"])
async def test_seed_free_task_types_give_the_same_bytes_for_any_seed(
    kind: str, request: pytest.FixtureRequest
) -> None:
    # The AGENTIC loop trusts SEED_FREE on whichever backend runs the tasks.
    backend = _real_backend(kind, request)
    try:
        outputs: dict[tuple[TaskType, int], bytes] = {}
        for task_type, params in SEED_CHECKS.items():
            for seed in (1, 2):
                task = TaskRequest(
                    task_type=task_type,
                    params={"base_image": TEXTURED, **params, "seed": seed},
                    idempotency_key=f"contract-{next(_keys)}",
                    organization="default",
                )
                last = await _last(backend, await backend.submit(task))
                assert last.status is TaskStatus.COMPLETED, last.error_message
                outputs[task_type, seed] = last.outputs[0].data
            same = outputs[task_type, 1] == outputs[task_type, 2]
            assert same == (task_type in SEED_FREE), task_type
        plain = _request(base_image=TEXTURED, brightness=0.2)
        last = await _last(backend, await backend.submit(plain))
        assert last.outputs[0].data != outputs[TaskType.IMAGE_ADJUSTER, 1]  # gamma was applied
    finally:
        await backend.aclose()


async def test_a_task_is_found_by_its_idempotency_key(backend: ComputeBackend) -> None:
    request = _request()
    assert await backend.find(request.idempotency_key) is None
    compute_id = await backend.submit(request)
    assert await backend.find(request.idempotency_key) == compute_id
    assert await backend.find("never-used") is None
    await _last(backend, compute_id)
