"""Every strategy end to end on tiny diffusion models: gRPC -> service -> compute server.

The service (SQLite, the HTTP compute backend) sends its tasks to a compute server whose
model registry puts every diffusion task type on the tiny models this module builds; the
outputs come back verified, are stored, and their recipes say which model made them.
GetCapabilities says what serves each task type, as the compute server's health does.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings
from diffusion_rig import IGNORED_WARNINGS, Models, models_and_server
from fleet_rig import TOKEN
from google.protobuf import duration_pb2, json_format
from helpers import png_bytes, wait_terminal

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, resources_pb2
from scripts.faces import face_image
from server.app import App
from server.config import ComputeSettings

pytestmark = [*IGNORED_WARNINGS, pytest.mark.timeout(240)]
COMPLETED = enums_pb2.GENERATION_STATUS_COMPLETED


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Models, int]]:
    yield from models_and_server(workers="2")


@pytest.fixture
async def client(served: tuple[Models, int], tmp_path: Path) -> AsyncIterator[SartiqClient]:
    compute = ComputeSettings(
        backend="http", url=f"http://127.0.0.1:{served[1]}", token=TOKEN, timeout=60
    )
    settings = make_settings(tmp_path).model_copy(update={"compute": compute})
    async with App(settings) as app, SartiqClient(f"127.0.0.1:{app.port}") as client:
        yield client


async def _done(client: SartiqClient, generation_id: str) -> resources_pb2.Generation:
    done = await wait_terminal(client.generations, generation_id, timeout=180)
    problems = [p.error.message for p in done.predictions if p.HasField("error")]
    assert done.status == COMPLETED, problems
    return done


def _provider(artifact: resources_pb2.Artifact) -> dict[str, Any]:
    return json_format.MessageToDict(artifact.recipe.provider)


async def test_get_capabilities_says_what_serves_each_task_type(client: SartiqClient) -> None:
    capabilities = await client.capabilities()
    served = {
        enums_pb2.ComputeTaskType.Name(p.task_type): (p.provider, p.model, p.pipeline)
        for p in capabilities.task_providers
    }
    image = ("diffusion", "tiny-sd", "StableDiffusionPipeline")
    assert served == {
        "COMPUTE_TASK_TYPE_GENERATION": image,
        "COMPUTE_TASK_TYPE_EDITING": image,
        "COMPUTE_TASK_TYPE_REFINE": image,
        "COMPUTE_TASK_TYPE_VIDEO_GENERATION": (
            "diffusion",
            "tiny-svd",
            "StableVideoDiffusionPipeline",
        ),
        "COMPUTE_TASK_TYPE_BACKGROUND_FIX": image,
        "COMPUTE_TASK_TYPE_IMAGE_ADJUSTER": ("cpu", "", ""),
        "COMPUTE_TASK_TYPE_FACE_ENHANCER": image,
        "COMPUTE_TASK_TYPE_DETAIL_ENHANCER": image,
    }


async def test_generate_makes_a_batch_on_the_model_with_the_seed_recorded(
    client: SartiqClient,
) -> None:
    product = await client.create_entity("product", "Dress", images=[png_bytes((200, 20, 30))])
    created = await client.generate(
        product_id=product.id, shot_type_string="front", width=64, height=72, batch_size=2, seed=7
    )
    done = await _done(client, created.id)
    artifacts = [p.artifact for p in done.predictions]
    assert [(a.width, a.height, a.mime_type) for a in artifacts] == [(64, 72, "image/png")] * 2
    assert artifacts[0].sha256 != artifacts[1].sha256  # seeds 7 and 8
    assert [a.recipe.seed for a in artifacts] == [7, 8]
    provider = _provider(artifacts[0])
    assert (provider["provider"], provider["model"]) == ("diffusion", "tiny-sd")
    # The product's reference image went through image to image.
    assert provider["pipeline"] == "StableDiffusionImg2ImgPipeline"
    again = await _done(
        client,
        (
            await client.generate(
                product_id=product.id,
                shot_type_string="front",
                width=64,
                height=72,
                batch_size=1,
                seed=7,
            )
        ).id,
    )
    assert again.predictions[0].artifact.sha256 == artifacts[0].sha256  # the same seed


async def _upload(client: SartiqClient, data: bytes) -> str:
    return f"artifact:{(await client.upload(data)).sha256}"


async def test_every_other_strategy_runs_on_its_model(client: SartiqClient, tmp_path: Path) -> None:
    base = await _upload(client, png_bytes((30, 90, 200), (64, 80)))
    face = face_image(128, 128)
    face_path = tmp_path / "face.png"
    face.save(face_path)
    cases: list[tuple[Any, tuple[int, int], str]] = [
        (
            resources_pb2.EditingParams(
                base_img_path=base, tool=enums_pb2.EDITING_TOOL_EDIT, prompt="a blue coat"
            ),
            (64, 80),
            "StableDiffusionImg2ImgPipeline",
        ),
        (
            resources_pb2.RefineParams(
                base_image_url=base, upscale_enabled=True, target_width=128, upscale_steps=2
            ),
            (128, 160),
            "StableDiffusionImg2ImgPipeline",
        ),
        (
            resources_pb2.BackgroundFixingParams(base_image_url=base, background_prompt="grey"),
            (64, 80),
            "StableDiffusionInpaintPipeline",
        ),
        (
            resources_pb2.FaceFixingParams(
                base_image_url=await _upload(client, face_path.read_bytes()), strength=0.8
            ),
            (128, 128),
            "StableDiffusionInpaintPipeline",
        ),
        (resources_pb2.ImageAdjustingParams(base_image_url=base, brightness=0.3), (64, 80), ""),
    ]
    for params, size, pipeline in cases:
        done = await _done(client, (await client.create(params)).id)
        artifact = done.predictions[0].artifact
        assert (artifact.width, artifact.height) == size, type(params).__name__
        provider = _provider(artifact)
        if pipeline:
            assert (provider["model"], provider["pipeline"]) == ("tiny-sd", pipeline)
        else:
            assert provider == {}  # IMAGE_ADJUSTER stays on the CPU processor


async def test_video_is_an_mp4_of_fps_times_duration_frames(
    client: SartiqClient, tmp_path: Path
) -> None:
    params = resources_pb2.VideoParams(
        base_image_url=await _upload(client, png_bytes((200, 120, 20), (64, 48))),
        fps=6,
        duration=duration_pb2.Duration(seconds=1),
        motion_bucket_id=100,
    )
    done = await _done(client, (await client.create(params)).id)
    artifact = done.predictions[0].artifact
    assert (artifact.mime_type, artifact.frame_count) == ("video/mp4", 6)
    path = tmp_path / "out.mp4"
    await client.download(artifact.sha256, path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact.sha256
    assert _provider(artifact)["pipeline"] == "StableVideoDiffusionPipeline"
