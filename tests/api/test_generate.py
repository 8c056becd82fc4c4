"""GENERATE under BASE, end to end on the local CPU backend."""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator

import pytest
from google.protobuf import json_format
from helpers import GenerationStub, wait_terminal
from PIL import Image

from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2, resources_pb2
from server.app import App
from server.config import Settings
from server.media.artifacts import FileArtifactStore


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    """The real local backend instead of the fake."""
    async with App(settings) as running:
        yield running


def request(**params: object) -> generation_service_pb2.CreateGenerateGenerationRequest:
    return generation_service_pb2.CreateGenerateGenerationRequest(
        params=resources_pb2.GenerateParams(**params)  # type: ignore[arg-type]
    )


def artifact_bytes(app: App, prediction: resources_pb2.Prediction) -> bytes:
    assert prediction.artifact.uri == f"artifacts/{prediction.artifact.sha256}"
    return (
        FileArtifactStore(app.settings.media.artifact_dir)
        .find_sync(prediction.artifact.sha256)
        .read_bytes()
    )


async def test_batch_of_three_completes_with_distinct_pngs(
    app: App, stub: GenerationStub, subject_id: str, product_id: str
) -> None:
    created = await stub.CreateGenerateGeneration(
        request(
            subject_id=subject_id,
            product_id=product_id,
            shot_type_string="full-body front",
            batch_size=3,
            width=256,
            height=320,
            seed=42,
        )
    )
    assert created.generation.status == enums_pb2.GENERATION_STATUS_PENDING
    assert len(created.generation.predictions) == 3

    done = await wait_terminal(stub, created.generation.id)

    assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED
    assert done.prediction_counts.completed_count == 3
    digests = set()
    for prediction in done.predictions:
        data = artifact_bytes(app, prediction)
        assert hashlib.sha256(data).hexdigest() == prediction.artifact.sha256
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG"
        assert image.size == (256, 320)
        assert (prediction.artifact.width, prediction.artifact.height) == (256, 320)
        assert prediction.tasks[0].status == enums_pb2.COMPUTE_TASK_STATUS_COMPLETED
        assert prediction.artifact.recipe.backend == "local"
        digests.add(prediction.artifact.sha256)
    assert len(digests) == 3
    assert [p.seed for p in done.predictions] == [42, 43, 44]


async def test_same_seed_gives_same_bytes(app: App, stub: GenerationStub, product_id: str) -> None:
    ids = []
    for _ in range(2):
        created = await stub.CreateGenerateGeneration(
            request(
                product_id=product_id, shot_type_string="close-up", width=128, height=128, seed=7
            )
        )
        ids.append(created.generation.id)
    first, second = [await wait_terminal(stub, i) for i in ids]
    assert first.predictions[0].artifact.sha256 == second.predictions[0].artifact.sha256
    assert artifact_bytes(app, first.predictions[0]) == artifact_bytes(app, second.predictions[0])
    # The same bytes again: this organization first held them with the first generation.
    assert first.predictions[0].artifact.create_time == second.predictions[0].artifact.create_time


async def test_resource_echoes_defaults_and_prompt_inputs(
    stub: GenerationStub, product_id: str
) -> None:
    created = await stub.CreateGenerateGeneration(
        request(product_id=product_id, shot_type_string="  half body  ", width=64, height=64)
    )
    params = created.generation.generate
    assert params.batch_size == 1
    assert params.steps == 30
    assert params.shot_type_string == "half body"
    assert params.HasField("seed")
    assert created.generation.orchestration.type == enums_pb2.GENERATION_TYPE_BASE
    task_params = json_format.MessageToDict(created.generation.predictions[0].tasks[0].parameters)
    assert "Red dress" in task_params["prompt"]
    assert task_params["product"]["weight"] == pytest.approx(0.8)
    done = await wait_terminal(stub, created.generation.id)
    assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED
