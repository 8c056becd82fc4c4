"""The diffusion provider through the compute server's HTTP API, on tiny random weights.

A compute server process serves a model registry of two tiny models this module builds
(an SD 1.x-class image model and an SVD-class video model). Every diffusion task type runs
on them in its worker process, on the CPU; the HTTP adapter (the service's own client of
the compute server) submits, follows and fetches, so every output is verified by its hash
and probed.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from diffusion_rig import IGNORED_WARNINGS, Models, models_and_server
from fleet_rig import TOKEN
from helpers import png_bytes
from PIL import Image

from scripts.faces import face_image
from server.compute.base import OutputFile, TaskRequest, TaskSnapshot
from server.compute.http import HttpComputeBackend
from server.compute.wire import HealthAnswer, parse
from server.domain.enums import TaskStatus, TaskType
from server.domain.states import TASK_TERMINAL

pytestmark = [*IGNORED_WARNINGS, pytest.mark.timeout(240)]
WAIT_S = 120.0


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Models, int]]:
    yield from models_and_server()


class Inputs:
    """Input bytes by reference, as the adapter reads them."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def add(self, data: bytes) -> str:
        reference = f"artifact:{hashlib.sha256(data).hexdigest()}"
        self.blobs[reference] = data
        return reference

    def resolve(self, reference: str) -> bytes:
        try:
            return self.blobs[reference]
        except KeyError:
            raise FileNotFoundError(reference) from None


@pytest.fixture
async def compute(served: tuple[Models, int]) -> AsyncIterator[tuple[HttpComputeBackend, Inputs]]:
    inputs = Inputs()
    backend = HttpComputeBackend(
        f"http://127.0.0.1:{served[1]}", resolve=inputs.resolve, token=TOKEN, timeout_s=60
    )
    try:
        yield backend, inputs
    finally:
        await backend.aclose()


async def _last(backend: HttpComputeBackend, compute_id: str) -> TaskSnapshot:
    async def last() -> TaskSnapshot:
        snap = None
        async for snap in backend.watch(compute_id):
            if snap.status in TASK_TERMINAL:
                return snap
        raise AssertionError(f"{compute_id} ended without a terminal snapshot: {snap}")

    return await asyncio.wait_for(last(), WAIT_S)


async def _run(
    backend: HttpComputeBackend, task_type: TaskType, params: dict[str, Any], key: str
) -> OutputFile:
    compute_id = await backend.submit(TaskRequest(task_type, params, key, "org"))
    snap = await _last(backend, compute_id)
    assert snap.status is TaskStatus.COMPLETED, snap.error_message
    (output,) = snap.outputs
    return output


def _pixels(output: OutputFile) -> np.ndarray[Any, np.dtype[np.int16]]:
    with Image.open(io.BytesIO(output.data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_health_names_the_provider_and_model_of_each_task_type(
    served: tuple[Models, int],
) -> None:
    async with httpx.AsyncClient() as http:
        answer = parse(
            HealthAnswer, (await http.get(f"http://127.0.0.1:{served[1]}/health")).content
        )
    image = {"provider": "diffusion", "model": "tiny-sd", "pipeline": "StableDiffusionPipeline"}
    assert answer.providers == {
        "GENERATION": image,
        "EDITING": image,
        "REFINE": image,
        "VIDEO_GENERATION": {
            "provider": "diffusion",
            "model": "tiny-svd",
            "pipeline": "StableVideoDiffusionPipeline",
        },
        "BACKGROUND_FIX": image,
        "IMAGE_ADJUSTER": {"provider": "cpu"},
        "FACE_ENHANCER": image,
        "DETAIL_ENHANCER": image,
    }


async def test_generation_is_text_to_image_at_the_size_asked_and_the_seed_decides(
    compute: tuple[HttpComputeBackend, Inputs],
) -> None:
    backend, _ = compute
    params = {"prompt": "a red dress", "width": 48, "height": 40, "steps": 4, "seed": 3}
    first = await _run(backend, TaskType.GENERATION, params, "g1")
    again = await _run(backend, TaskType.GENERATION, params, "g2")
    other = await _run(backend, TaskType.GENERATION, {**params, "seed": 4}, "g3")
    assert (first.mime_type, first.width, first.height) == ("image/png", 48, 40)
    assert first.data == again.data  # the same seed: the same bytes
    assert other.data != first.data
    assert first.recipe == {
        "provider": "diffusion",
        "model": "tiny-sd",
        "pipeline": "StableDiffusionPipeline",
        "scheduler": "DDIMScheduler",
        "steps": 4,
        "guidance_scale": 5.0,
        "strength": 1.0,
        "loras": [],
    }


async def test_a_lora_changes_the_output_with_its_weight_and_is_recorded(
    served: tuple[Models, int], compute: tuple[HttpComputeBackend, Inputs]
) -> None:
    models, _ = served
    backend, inputs = compute
    lora = inputs.add(models.lora)
    base = {"prompt": "a red dress", "width": 32, "height": 32, "steps": 4, "seed": 11}
    plain = await _run(backend, TaskType.GENERATION, base, "l0")

    def styled(weight: float) -> dict[str, Any]:
        return {**base, "style": {"name": "s", "images": [], "lora_uri": lora, "weight": weight}}

    full = await _run(backend, TaskType.GENERATION, styled(1.0), "l1")
    half = await _run(backend, TaskType.GENERATION, styled(0.5), "l2")
    assert full.data != plain.data
    assert half.data not in (plain.data, full.data)
    digest = hashlib.sha256(models.lora).hexdigest()
    assert full.recipe["loras"] == [{"role": "style", "sha256": digest, "weight": 1.0}]
    # Loaded once and kept: a task without it runs without it again.
    assert (await _run(backend, TaskType.GENERATION, base, "l3")).data == plain.data


async def test_a_reference_image_goes_through_image_to_image(
    compute: tuple[HttpComputeBackend, Inputs],
) -> None:
    backend, inputs = compute
    product = {"name": "dress", "images": [inputs.add(png_bytes((200, 20, 30), (40, 56)))]}
    params = {"prompt": "x", "width": 32, "height": 48, "steps": 4, "seed": 1, "product": product}
    output = await _run(backend, TaskType.GENERATION, params, "r1")
    assert (output.width, output.height) == (32, 48)
    assert output.recipe["pipeline"] == "StableDiffusionImg2ImgPipeline"
    assert output.recipe["strength"] == 0.75


@pytest.mark.parametrize(
    ("task_type", "extra", "size", "pipeline"),
    [
        (TaskType.EDITING, {"prompt": "a blue coat"}, (64, 48), "StableDiffusionImg2ImgPipeline"),
        (TaskType.DETAIL_ENHANCER, {"strength": 0.5}, (64, 48), "StableDiffusionImg2ImgPipeline"),
        (
            TaskType.REFINE,
            {"upscale_enabled": True, "upscale_factor": 2.0, "upscale_steps": 2},
            (128, 96),
            "StableDiffusionImg2ImgPipeline",
        ),
        (
            TaskType.BACKGROUND_FIX,
            {"background_prompt": "grey"},
            (64, 48),
            "StableDiffusionInpaintPipeline",
        ),
    ],
)
async def test_each_image_task_type_runs_its_pipeline_at_the_right_size(
    compute: tuple[HttpComputeBackend, Inputs],
    task_type: TaskType,
    extra: dict[str, Any],
    size: tuple[int, int],
    pipeline: str,
) -> None:
    backend, inputs = compute
    base = inputs.add(png_bytes((30, 90, 200), (64, 48)))
    params = {"base_image": base, "seed": 5, **extra}
    output = await _run(backend, task_type, params, f"t-{task_type.value}")
    assert (output.mime_type, output.width, output.height) == ("image/png", *size)
    assert (output.recipe["provider"], output.recipe["pipeline"]) == ("diffusion", pipeline)
    again = await _run(backend, task_type, params, f"t2-{task_type.value}")
    assert again.data == output.data


async def test_face_enhancer_inpaints_the_face_and_keeps_the_rest(
    compute: tuple[HttpComputeBackend, Inputs],
) -> None:
    backend, inputs = compute
    source = face_image(128, 128)
    params = {"base_image": inputs.add(_png(source)), "seed": 2, "strength": 0.9}
    output = await _run(backend, TaskType.FACE_ENHANCER, params, "f1")
    assert output.recipe["pipeline"] == "StableDiffusionInpaintPipeline"
    before = np.asarray(source.convert("RGB"), dtype=np.int16)
    changed = np.abs(_pixels(output) - before).max(axis=-1) > 0
    assert changed.any()
    ys, xs = np.nonzero(changed)
    h, w = changed.shape
    assert min(ys.min(), xs.min(), h - 1 - ys.max(), w - 1 - xs.max()) > 0  # inside, not edges
    # No face: the image as it was, and a note.
    plain = {"base_image": inputs.add(png_bytes((10, 120, 10), (64, 64))), "seed": 2}
    unchanged = await _run(backend, TaskType.FACE_ENHANCER, plain, "f2")
    assert unchanged.notes == ("no face detected; the image is unchanged",)


async def test_image_adjuster_stays_on_the_cpu_processor(
    compute: tuple[HttpComputeBackend, Inputs],
) -> None:
    backend, inputs = compute
    params = {"base_image": inputs.add(png_bytes((90, 90, 90), (32, 32))), "seed": 1}
    output = await _run(backend, TaskType.IMAGE_ADJUSTER, {**params, "brightness": 0.3}, "a1")
    assert output.recipe == {}


async def test_video_is_an_mp4_of_fps_times_duration_frames(
    compute: tuple[HttpComputeBackend, Inputs], tmp_path: Path
) -> None:
    from helpers import read_mp4

    backend, inputs = compute
    params = {
        "base_image": inputs.add(png_bytes((200, 120, 20), (64, 48))),
        "seed": 9,
        "fps": 6,
        "duration_s": 1.5,
        "motion_bucket_id": 90,
    }
    output = await _run(backend, TaskType.VIDEO_GENERATION, params, "v1")
    assert (output.mime_type, output.frame_count, output.width, output.height) == (
        "video/mp4",
        9,
        64,
        48,
    )
    _, frames = read_mp4(output.data, tmp_path)
    assert len(frames) == 9
    assert output.recipe["pipeline"] == "StableVideoDiffusionPipeline"
    assert (output.recipe["fps"], output.recipe["motion_bucket_id"]) == (6, 90)


async def test_a_cancel_stops_the_denoising_between_steps_and_frees_the_worker(
    compute: tuple[HttpComputeBackend, Inputs],
) -> None:
    backend, _ = compute
    # Long enough to cancel mid-way: 150 steps at 256 x 256 on the one worker.
    long = {"prompt": "x", "width": 256, "height": 256, "steps": 150, "seed": 1}
    compute_id = await backend.submit(TaskRequest(TaskType.GENERATION, long, "c1", "org"))

    async def denoising() -> TaskSnapshot:
        async for snap in backend.watch(compute_id):
            if snap.status is TaskStatus.RUNNING and 0 < snap.progress < 0.5:
                return snap
        raise AssertionError("the task ended before it was seen denoising")

    await asyncio.wait_for(denoising(), WAIT_S)
    assert await asyncio.wait_for(backend.cancel(compute_id), WAIT_S)
    last = await _last(backend, compute_id)
    assert last.status is TaskStatus.CANCELLED
    assert last.progress < 1.0
    assert not last.outputs
    # The one worker takes the next task at once.
    quick = {"prompt": "y", "width": 16, "height": 16, "steps": 2, "seed": 1}
    assert (await _run(backend, TaskType.GENERATION, quick, "c2")).width == 16
