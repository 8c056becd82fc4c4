"""AGENTIC never wastes an attempt, through the gRPC API.

With the fake compute backend and a scripted evaluator: an attempt that would compute
what an earlier one did is not run, and a byte-identical output is not a new candidate.
With the real local backend and evaluator, on a dark, blurred picture made here: every
attempt's output is new, and the accepted one is brighter and sharper than the input by
a measure this file computes itself; a sharp, well-exposed picture is accepted unchanged.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import make_settings
from google.protobuf import json_format
from helpers import create_product, png_bytes, wait_terminal, watch_all
from pictures import dark_and_blurred, png, scene
from PIL import Image

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2, resources_pb2
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.domain.model import Evaluation
from server.evaluation.base import Evaluators
from server.evaluation.fake import ScriptedEvaluator

pb = generation_service_pb2
A = enums_pb2
Run = Callable[..., Awaitable[resources_pb2.Generation]]


def _soft(score: float) -> Evaluation:
    """A scripted evaluation that points at the detail pass."""
    return Evaluation(score, {"sharpness": 0.2}, "soft", "local", {})


class Scripted:
    """A server on the fake compute with a scripted evaluator, and a client of it."""

    def __init__(self, app: App, client: SartiqClient, compute: FakeComputeBackend) -> None:
        self.app, self.client, self.compute = app, client, compute

    async def adjust(self, max_attempts: int) -> resources_pb2.Generation:
        """An AGENTIC IMAGE_ADJUSTING generation (seed-free: IMAGE_ADJUSTER), to its end."""
        sha = (await self.client.upload(png_bytes((90, 120, 150)))).sha256
        request = pb.CreateImageAdjustingGenerationRequest(
            params=resources_pb2.ImageAdjustingParams(base_image_url=f"artifact:{sha}")
        )
        return await self._run(request, "CreateImageAdjustingGeneration", max_attempts)

    async def generate(self, max_attempts: int) -> resources_pb2.Generation:
        """An AGENTIC GENERATE generation (GENERATION reads the seed), to its end."""
        product = await create_product(self.client.catalog, "Dress")
        request = pb.CreateGenerateGenerationRequest(
            params=resources_pb2.GenerateParams(product_id=product, shot_type_string="front")
        )
        return await self._run(request, "CreateGenerateGeneration", max_attempts)

    async def _run(
        self, request: object, method: str, max_attempts: int
    ) -> resources_pb2.Generation:
        orchestration = request.orchestration  # type: ignore[attr-defined]
        orchestration.type = A.GENERATION_TYPE_AGENTIC
        orchestration.agentic.max_attempts = max_attempts
        orchestration.agentic.min_confidence_score = 0.9
        created = await getattr(self.client.generations, method)(request)
        return await wait_terminal(self.client.generations, created.generation.id)


@pytest.fixture
async def scripted(
    tmp_path: Path,
) -> AsyncIterator[Callable[[ScriptedEvaluator], Awaitable[Scripted]]]:
    opened: list[tuple[App, SartiqClient]] = []

    async def start(evaluator: ScriptedEvaluator) -> Scripted:
        compute = FakeComputeBackend()
        app = App(
            make_settings(tmp_path),
            compute=compute,
            evaluators=Evaluators({"local": evaluator}),
        )
        await app.start()
        client = SartiqClient(f"127.0.0.1:{app.port}")
        opened.append((app, client))
        return Scripted(app, client, compute)

    yield start
    for app, client in opened:
        await client.close()
        await app.shutdown()


async def test_a_seed_free_attempt_with_no_change_to_make_is_not_run(
    scripted: Callable[[ScriptedEvaluator], Awaitable[Scripted]],
) -> None:
    evaluator = ScriptedEvaluator([0.5])  # below the threshold, and no criterion to act on
    server = await scripted(evaluator)
    done = await server.adjust(max_attempts=3)
    prediction = done.predictions[0]
    assert done.status == A.GENERATION_STATUS_COMPLETED
    assert prediction.agentic.stop_reason == A.STOP_REASON_NO_FURTHER_CHANGE
    assert [a.number for a in prediction.agentic.attempts] == [1]
    assert prediction.agentic.best_attempt == 1
    assert len(server.compute.submitted) == 1  # attempt 2 would have been a new seed only
    notes = [e.note for e in await watch_all(server.client.generations, done.id)]
    stop = next(n for n in notes if "nothing more can be changed" in n)
    assert stop.startswith("attempt 2 would compute what attempt 1 did")
    assert "accepted attempt 1" in stop


async def test_a_lever_at_its_limit_ends_the_loop_instead_of_a_repeat(
    scripted: Callable[[ScriptedEvaluator], Awaitable[Scripted]],
) -> None:
    server = await scripted(ScriptedEvaluator([_soft(0.3), _soft(0.4), _soft(0.5), _soft(0.45)]))
    done = await server.adjust(max_attempts=6)
    shot = done.predictions[0].agentic
    changes = [json_format.MessageToDict(a.adjustments).get("detail_pass") for a in shot.attempts]
    assert changes == [None, 0.6, 0.8, 1.0]  # the detail pass grew to its bound, then stopped
    assert shot.stop_reason == A.STOP_REASON_NO_FURTHER_CHANGE
    assert shot.best_attempt == 3
    assert len(server.compute.submitted) == 1 + 2 + 2 + 2  # IMAGE_ADJUSTER (+ detail pass)
    notes = [e.note for e in await watch_all(server.client.generations, done.id)]
    assert any(
        "detail pass at its limit (1)" in n and "would compute what attempt 4" in n for n in notes
    )


async def test_a_byte_identical_output_is_not_a_new_candidate(
    scripted: Callable[[ScriptedEvaluator], Awaitable[Scripted]],
) -> None:
    evaluator = ScriptedEvaluator([0.5, 0.95])  # 0.95 would pass, were it ever asked
    server = await scripted(evaluator)
    server.compute.output_key = lambda request: "always the same picture"
    done = await server.generate(max_attempts=3)
    shot = done.predictions[0].agentic
    first, second, third = shot.attempts
    assert len({a.seed for a in shot.attempts}) == 3  # GENERATION reads the seed: each ran
    assert first.artifact.sha256 == second.artifact.sha256 == third.artifact.sha256
    assert len(evaluator.calls) == 1  # the repeats were not judged again
    for repeat in (second, third):
        assert repeat.status == A.ATTEMPT_STATUS_EVALUATED
        assert repeat.evaluation.score == pytest.approx(0.5)
        assert repeat.evaluation.feedback.startswith(
            "same output as attempt 1: not a new candidate"
        )
    assert shot.best_attempt == 1
    assert shot.stop_reason == A.STOP_REASON_ATTEMPTS_EXHAUSTED
    notes = [e.note for e in await watch_all(server.client.generations, done.id)]
    assert any("attempt 2's output is byte-identical to attempt 1's" in n for n in notes)


# -- the real thing: local backend, local evaluator, a picture made here -------------------


def _luma(data: bytes) -> np.ndarray[tuple[int, int], np.dtype[np.float64]]:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"), dtype=np.float64)


def fine_detail(data: bytes) -> float:
    """Contrast-normalised sharpness, measured here: fine over coarse spectral energy.

    The luma's spectral energy at 4-10 pixel periods over that at 20-100 pixel periods;
    a gain or an offset scales (or leaves) both alike, a blur takes the fine band first.
    """
    grey = _luma(data)
    energy = np.abs(np.fft.rfft2(grey - grey.mean())) ** 2
    radius = np.hypot(np.fft.fftfreq(grey.shape[0])[:, None], np.fft.rfftfreq(grey.shape[1]))
    fine = energy[(radius > 0.1) & (radius <= 0.25)].sum()
    coarse = energy[(radius > 0.01) & (radius <= 0.05)].sum()
    return float(fine / coarse)


async def _agentic_adjust(client: SartiqClient, picture: bytes) -> resources_pb2.Generation:
    sha = (await client.upload(picture)).sha256
    request = pb.CreateImageAdjustingGenerationRequest(
        params=resources_pb2.ImageAdjustingParams(base_image_url=f"artifact:{sha}")
    )
    request.orchestration.type = A.GENERATION_TYPE_AGENTIC
    request.orchestration.agentic.max_attempts = 3
    request.orchestration.agentic.min_confidence_score = 0.9
    created = await client.generations.CreateImageAdjustingGeneration(request)
    done = await wait_terminal(client.generations, created.generation.id, timeout=60)
    assert done.status == A.GENERATION_STATUS_COMPLETED, done.error.message
    return done


async def _bytes(client: SartiqClient, sha: str, tmp_path: Path) -> bytes:
    path = tmp_path / sha
    if not path.exists():
        await client.download(sha, path)
    return path.read_bytes()


async def test_a_dark_blurred_picture_gets_brighter_and_sharper_and_no_attempt_repeats(
    local: SartiqClient, tmp_path: Path
) -> None:
    picture = png(dark_and_blurred(scene(), blur=2.0, gain=0.35))
    done = await _agentic_adjust(local, picture)
    shot = done.predictions[0].agentic
    outputs = [await _bytes(local, a.artifact.sha256, tmp_path) for a in shot.attempts]
    print(f"input: level {_luma(picture).mean() / 255:.3f}, fine detail {fine_detail(picture):.4f}")
    for attempt, output in zip(shot.attempts, outputs, strict=True):
        figures = json_format.MessageToDict(attempt.evaluation)
        print(
            f"attempt {attempt.number}: level {_luma(output).mean() / 255:.3f}, fine detail "
            f"{fine_detail(output):.4f}, evaluation {figures}, why: {attempt.adjustment_reason}"
        )
    assert len(shot.attempts) >= 2
    hashes = [a.artifact.sha256 for a in shot.attempts]
    assert len(set(hashes)) == len(hashes)  # every output differs from every earlier one
    accepted = outputs[shot.best_attempt - 1]
    assert shot.best_attempt > 1
    assert _luma(accepted).mean() > _luma(picture).mean() + 0.15 * 255
    assert fine_detail(accepted) > 1.1 * fine_detail(picture)
    scores = [a.evaluation.score for a in shot.attempts]
    assert scores[shot.best_attempt - 1] == max(scores) > scores[0]


async def test_a_sharp_well_exposed_picture_is_accepted_unchanged_at_attempt_1(
    local: SartiqClient, tmp_path: Path
) -> None:
    picture = png(scene())
    done = await _agentic_adjust(local, picture)
    shot = done.predictions[0].agentic
    (attempt,) = shot.attempts
    print(f"attempt 1: evaluation {json_format.MessageToDict(attempt.evaluation)}")
    assert shot.stop_reason == A.STOP_REASON_THRESHOLD_MET
    assert attempt.evaluation.score >= 0.9
    output = await _bytes(local, done.predictions[0].artifact.sha256, tmp_path)
    assert np.array_equal(_luma(output), _luma(picture))
    with Image.open(io.BytesIO(output)) as got, Image.open(io.BytesIO(picture)) as sent:
        assert np.array_equal(np.asarray(got), np.asarray(sent))
