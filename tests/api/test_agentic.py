"""AGENTIC orchestration through the gRPC API.

With the fake compute backend and a scripted evaluator the loop's rules are checked one
by one (accept, retry, stop, best not last, failures, cancel, restart); with the real
local backend and the local evaluator, that a bad image scores lower and that the
adjusted retry really is better.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_settings
from google.protobuf import json_format
from helpers import (
    GenerationStub,
    assert_eventually,
    create_product,
    field_violations,
    generate_request,
    wait_submitted,
    wait_terminal,
    watch_all,
)
from PIL import Image, ImageEnhance, ImageFilter

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2_grpc
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2, resources_pb2
from scripts.faces import face_image
from server.app import App
from server.compute.base import ComputeError
from server.compute.fake import FakeComputeBackend
from server.config import Settings
from server.domain.model import Evaluation
from server.evaluation.base import Evaluators
from server.evaluation.fake import ScriptedEvaluator

pb = generation_service_pb2
A = enums_pb2
EVENT = enums_pb2.EventKind


def agentic_request(
    product_id: str, *, max_attempts: int = 3, min_score: float = 0.7, batch: int = 1
) -> pb.CreateGenerateGenerationRequest:
    request = generate_request(product_id, batch=batch)
    request.orchestration.type = A.GENERATION_TYPE_AGENTIC
    request.orchestration.agentic.max_attempts = max_attempts
    request.orchestration.agentic.min_confidence_score = min_score
    return request


class Harness:
    """A server on the fake compute with a scripted evaluator, restartable on one database."""

    def __init__(self, tmp_path: Path) -> None:
        self.settings: Settings = make_settings(tmp_path)
        self.compute = FakeComputeBackend()
        self.evaluator = ScriptedEvaluator([0.9])
        self.app: App | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self, evaluator: ScriptedEvaluator | None = None) -> GenerationStub:
        if evaluator is not None:
            self.evaluator = evaluator
        self.app = App(
            self.settings,
            compute=self.compute,
            evaluators=Evaluators({"local": self.evaluator}),
        )
        await self.app.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.app.port}")
        return GenerationStub(self.channel)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
        if self.app is not None:
            await self.app.shutdown()
        self.app = self.channel = None

    async def product(self) -> str:
        assert self.channel is not None
        return await create_product(
            catalog_service_pb2_grpc.CatalogServiceStub(self.channel), "Dress"
        )


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    running = Harness(tmp_path)
    yield running
    await running.stop()


async def _run(
    harness: Harness, script: list[float | Evaluation | Exception], **options: Any
) -> tuple[GenerationStub, resources_pb2.Generation]:
    stub = await harness.start(ScriptedEvaluator(script))
    created = await stub.CreateGenerateGeneration(
        agentic_request(await harness.product(), **options)
    )
    return stub, await wait_terminal(stub, created.generation.id)


def _attempts(generation: resources_pb2.Generation, index: int = 0) -> list[resources_pb2.Attempt]:
    return list(generation.predictions[index].agentic.attempts)


# -- the loop's rules, with scripted scores ------------------------------------------------


async def test_the_first_attempt_above_the_threshold_is_accepted(harness: Harness) -> None:
    _, done = await _run(harness, [0.9])
    assert done.status == A.GENERATION_STATUS_COMPLETED
    prediction = done.predictions[0]
    shot = prediction.agentic
    assert (shot.attempt_count, shot.best_attempt) == (1, 1)
    assert shot.stop_reason == A.STOP_REASON_THRESHOLD_MET
    (attempt,) = shot.attempts
    assert attempt.status == A.ATTEMPT_STATUS_EVALUATED
    assert attempt.evaluation.score == pytest.approx(0.9)
    assert attempt.evaluation.provider == "local"
    assert list(attempt.task_ids) == [t.id for t in prediction.tasks]
    assert prediction.artifact.sha256 == attempt.artifact.sha256
    assert prediction.score == pytest.approx(0.9)
    assert prediction.seed == attempt.seed
    assert json_format.MessageToDict(done.orchestration.agentic) == {
        "maxAttempts": 3,
        "minConfidenceScore": 0.7,
        "evaluationProvider": "auto",
    }
    assert len(harness.evaluator.calls) == 1
    assert harness.evaluator.calls[0].output  # the output's real bytes were judged


async def test_below_the_threshold_it_retries_with_a_new_seed_until_one_passes(
    harness: Harness,
) -> None:
    _, done = await _run(harness, [0.3, 0.8])
    first, second = _attempts(done)
    assert second.seed != first.seed
    assert "attempt 1 scored 0.30" in second.adjustment_reason
    assert done.predictions[0].agentic.stop_reason == A.STOP_REASON_THRESHOLD_MET
    assert done.predictions[0].agentic.best_attempt == 2
    assert done.predictions[0].artifact.sha256 == second.artifact.sha256
    tasks = done.predictions[0].tasks
    assert [(t.attempt_id, t.step) for t in tasks] == [(first.id, 0), (second.id, 0)]
    assert tasks[1].parameters["seed"] == second.seed
    assert len(harness.compute.submitted) == 2


async def test_it_stops_at_max_attempts_and_accepts_the_best_not_the_last(
    harness: Harness,
) -> None:
    _, done = await _run(harness, [0.5, 0.6, 0.4])
    prediction = done.predictions[0]
    attempts = _attempts(done)
    assert [a.number for a in attempts] == [1, 2, 3]
    assert [round(a.evaluation.score, 2) for a in attempts] == [0.5, 0.6, 0.4]
    assert prediction.agentic.stop_reason == A.STOP_REASON_ATTEMPTS_EXHAUSTED
    assert prediction.agentic.best_attempt == 2
    assert prediction.artifact.sha256 == attempts[1].artifact.sha256
    assert prediction.seed == attempts[1].seed
    assert prediction.score == pytest.approx(0.6)
    assert len({a.seed for a in attempts}) == 3
    assert done.status == A.GENERATION_STATUS_COMPLETED


async def test_on_a_tie_the_earliest_attempt_wins(harness: Harness) -> None:
    _, done = await _run(harness, [0.5, 0.5], max_attempts=2)
    assert done.predictions[0].agentic.best_attempt == 1
    assert done.predictions[0].artifact.sha256 == _attempts(done)[0].artifact.sha256


async def test_the_change_follows_the_evaluation(harness: Harness) -> None:
    soft = Evaluation(
        score=0.4,
        criteria={"sharpness": 0.2, "exposure": 0.3, "contrast": 0.9},
        feedback="soft; under-exposed",
        provider="local",
        measures={"mean_level": 0.3},
    )
    _, done = await _run(harness, [soft, 0.9])
    second = _attempts(done)[1]
    changes = json_format.MessageToDict(second.adjustments)
    assert changes["steps"] == 45  # 30 + 15
    assert changes["detail_pass"] == pytest.approx(0.6)
    assert changes["exposure_pass"]["brightness"] == pytest.approx(0.5)  # 0.3 -> 0.45
    types = [t.task_type for t in done.predictions[0].tasks if t.attempt_id == second.id]
    assert types == [
        A.COMPUTE_TASK_TYPE_GENERATION,
        A.COMPUTE_TASK_TYPE_IMAGE_ADJUSTER,
        A.COMPUTE_TASK_TYPE_DETAIL_ENHANCER,
    ]
    assert "soft (sharpness 0.20)" in second.adjustment_reason
    assert "mean level 0.30" in second.adjustment_reason
    assert len(second.task_ids) == 3


async def test_the_history_is_in_the_event_stream(harness: Harness) -> None:
    stub, done = await _run(harness, [0.3, 0.8])
    events = await watch_all(stub, done.id)
    attempt_events = [e for e in events if e.kind == EVENT.EVENT_KIND_ATTEMPT_CHANGED]
    statuses = [(e.attempt.number, e.attempt.status) for e in attempt_events]
    assert statuses == [
        (1, A.ATTEMPT_STATUS_RUNNING),
        (1, A.ATTEMPT_STATUS_EVALUATING),
        (1, A.ATTEMPT_STATUS_EVALUATED),
        (2, A.ATTEMPT_STATUS_PENDING),
        (2, A.ATTEMPT_STATUS_RUNNING),
        (2, A.ATTEMPT_STATUS_EVALUATING),
        (2, A.ATTEMPT_STATUS_EVALUATED),
    ]
    notes = [e.note for e in attempt_events]
    assert notes[2].startswith("attempt 1 scored 0.30")
    assert notes[3].startswith("retrying: attempt 1 scored 0.30")
    accepted = [e for e in events if e.note.startswith("accepted attempt 2")]
    assert accepted
    assert accepted[0].prediction.status == A.PREDICTION_STATUS_COMPLETED
    evaluating = [
        e.prediction.status for e in events if e.kind == EVENT.EVENT_KIND_PREDICTION_CHANGED
    ]
    assert A.PREDICTION_STATUS_EVALUATING in evaluating


async def test_a_failed_attempt_counts_as_zero_and_the_next_one_runs(harness: Harness) -> None:
    harness.compute.submit_faults = [ComputeError("validation", "prompt rejected")]
    _, done = await _run(harness, [0.8])
    first, second = _attempts(done)
    assert first.status == A.ATTEMPT_STATUS_FAILED
    assert first.error.reason == "COMPUTE_FAILED"
    assert not first.HasField("evaluation")
    assert "attempt 1 failed (prompt rejected)" in second.adjustment_reason
    assert done.predictions[0].agentic.best_attempt == 2
    assert done.status == A.GENERATION_STATUS_COMPLETED


async def test_when_every_attempt_fails_the_prediction_ends_in_error(harness: Harness) -> None:
    harness.compute.fail_with = ("internal", "gpu fell over")
    _, done = await _run(harness, [0.9], max_attempts=2)
    prediction = done.predictions[0]
    assert prediction.status == A.PREDICTION_STATUS_ERROR
    assert prediction.agentic.stop_reason == A.STOP_REASON_FAILED
    assert [a.status for a in prediction.agentic.attempts] == [A.ATTEMPT_STATUS_FAILED] * 2
    assert prediction.error.message == "gpu fell over"
    assert done.status == A.GENERATION_STATUS_FAILED
    assert not harness.evaluator.calls


async def test_an_evaluation_that_fails_fails_its_attempt(harness: Harness) -> None:
    _, done = await _run(harness, [RuntimeError("evaluator down"), 0.9])
    first, second = _attempts(done)
    assert first.status == A.ATTEMPT_STATUS_FAILED
    assert first.error.reason == "EVALUATION_FAILED"
    assert "evaluator down" in first.error.message
    assert second.status == A.ATTEMPT_STATUS_EVALUATED
    assert done.status == A.GENERATION_STATUS_COMPLETED


async def test_a_cancel_stops_the_loop_and_releases_the_task_in_flight(harness: Harness) -> None:
    stub = await harness.start(ScriptedEvaluator([0.2]))
    harness.compute.hold = True
    created = await stub.CreateGenerateGeneration(agentic_request(await harness.product()))
    await wait_submitted(harness.compute, 1)
    harness.compute.complete(next(iter(harness.compute.tasks)))
    await wait_submitted(harness.compute, 2)  # attempt 2 is in flight
    await stub.CancelGeneration(pb.CancelGenerationRequest(generation_id=created.generation.id))
    done = await wait_terminal(stub, created.generation.id)
    assert done.status == A.GENERATION_STATUS_CANCELLED
    first, second = _attempts(done)
    assert first.status == A.ATTEMPT_STATUS_EVALUATED
    assert second.status == A.ATTEMPT_STATUS_CANCELLED
    assert done.predictions[0].agentic.stop_reason == A.STOP_REASON_CANCELLED
    assert harness.compute.cancelled == [list(harness.compute.tasks)[1]]
    assert len(harness.compute.submitted) == 2  # no attempt 3


async def test_a_restart_mid_loop_resumes_at_the_attempt_in_flight(harness: Harness) -> None:
    stub = await harness.start(ScriptedEvaluator([0.2]))
    harness.compute.hold = True
    request = agentic_request(await harness.product())
    request.orchestration.agentic.expectations.framing = "full body"
    request.orchestration.agentic.expectations.instructions = "the dress must be red"
    created = await stub.CreateGenerateGeneration(request)
    generation_id = created.generation.id
    await wait_submitted(harness.compute, 1)
    harness.compute.complete(next(iter(harness.compute.tasks)))
    await wait_submitted(harness.compute, 2)

    async def attempt_two_recorded() -> bool:
        got = await stub.GetGeneration(pb.GetGenerationRequest(generation_id=generation_id))
        tasks = got.generation.predictions[0].tasks
        return len(tasks) == 2 and bool(tasks[1].compute_task_id)

    await assert_eventually(attempt_two_recorded)
    await harness.stop()

    stub = await harness.start(ScriptedEvaluator([0.95]))
    harness.compute.complete(list(harness.compute.tasks)[1])
    done = await wait_terminal(stub, generation_id)
    assert done.status == A.GENERATION_STATUS_COMPLETED
    first, second = _attempts(done)
    assert first.evaluation.score == pytest.approx(0.2)  # not evaluated again
    assert second.evaluation.score == pytest.approx(0.95)
    assert len(harness.evaluator.calls) == 1  # only attempt 2, by the new server
    assert len(harness.compute.submitted) == 2  # attempt 2 re-attached, not resubmitted
    expected = harness.evaluator.calls[0].expectations  # kept across the restart
    assert (expected.framing, expected.instructions) == ("full body", "the dress must be red")
    echoed = done.orchestration.agentic.expectations
    assert (echoed.framing, echoed.instructions) == ("full body", "the dress must be red")
    assert done.predictions[0].agentic.best_attempt == 2


async def test_an_evaluation_cut_by_a_restart_is_done_again(harness: Harness) -> None:
    held = ScriptedEvaluator([0.9])
    held.gate = asyncio.Event()
    stub = await harness.start(held)
    created = await stub.CreateGenerateGeneration(agentic_request(await harness.product()))
    generation_id = created.generation.id

    async def evaluating() -> bool:
        got = await stub.GetGeneration(pb.GetGenerationRequest(generation_id=generation_id))
        return got.generation.predictions[0].agentic.attempts[0].status == (
            A.ATTEMPT_STATUS_EVALUATING
        )

    await assert_eventually(evaluating)
    assert len(held.calls) == 1
    await harness.stop()
    stub = await harness.start(ScriptedEvaluator([0.85]))
    done = await wait_terminal(stub, generation_id)
    (attempt,) = _attempts(done)
    assert attempt.evaluation.score == pytest.approx(0.85)
    assert len(harness.evaluator.calls) == 1
    assert len(harness.compute.submitted) == 1


# -- what a create may ask for --------------------------------------------------------------


async def test_a_request_over_the_task_budget_is_refused_naming_the_fields(
    harness: Harness,
) -> None:
    stub = await harness.start()
    request = agentic_request(await harness.product(), max_attempts=10, batch=16)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateGenerateGeneration(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(caught.value)
    assert set(violations) == {"orchestration.agentic.max_attempts", "params.batch_size"}
    assert "up to 480 compute tasks" in violations["params.batch_size"]
    listed = await stub.ListGenerations(pb.ListGenerationsRequest())
    assert not listed.generations


async def test_unknown_providers_are_refused_and_the_known_ones_listed(harness: Harness) -> None:
    stub = await harness.start()
    request = agentic_request(await harness.product())
    request.orchestration.agentic.evaluation_provider = "oracle"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateGenerateGeneration(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "auto, local" in field_violations(caught.value)["orchestration.agentic.evaluation_provider"]
    )
    capabilities = await stub.GetCapabilities(pb.GetCapabilitiesRequest())
    assert list(capabilities.evaluation_providers) == ["auto", "local"]
    assert A.GENERATION_TYPE_AGENTIC in capabilities.generation_types


# -- the real thing: local backend, local evaluator ----------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bad(image: Image.Image) -> Image.Image:
    """Blurred and under-exposed."""
    return ImageEnhance.Brightness(image.filter(ImageFilter.GaussianBlur(2.5))).enhance(0.35)


async def _adjust(
    client: SartiqClient, image: bytes, max_attempts: int
) -> resources_pb2.Generation:
    sha = (await client.upload(image)).sha256
    request = pb.CreateImageAdjustingGenerationRequest(
        params=resources_pb2.ImageAdjustingParams(base_image_url=f"artifact:{sha}", seed=3)
    )
    request.orchestration.type = A.GENERATION_TYPE_AGENTIC
    request.orchestration.agentic.max_attempts = max_attempts
    request.orchestration.agentic.min_confidence_score = 0.95
    created = await client.generations.CreateImageAdjustingGeneration(request)
    done = await wait_terminal(client.generations, created.generation.id, timeout=60)
    assert done.status == A.GENERATION_STATUS_COMPLETED, done.error.message
    return done


async def test_a_blurred_dark_image_scores_below_a_sharp_balanced_one(
    local: SartiqClient,
) -> None:
    good = face_image(256, 256)
    sharp = await _adjust(local, _png(good), max_attempts=1)
    bad = await _adjust(local, _png(_bad(good)), max_attempts=1)
    good_eval = _attempts(sharp)[0].evaluation
    bad_eval = _attempts(bad)[0].evaluation
    assert bad_eval.score < good_eval.score
    assert bad_eval.criteria["sharpness"] < good_eval.criteria["sharpness"]
    assert bad_eval.criteria["exposure"] < good_eval.criteria["exposure"]
    assert "under-exposed" in bad_eval.feedback
    assert bad_eval.measures["mean_level"] < 0.3


async def test_the_adjusted_retry_of_a_bad_image_scores_higher_and_is_accepted(
    local: SartiqClient,
) -> None:
    done = await _adjust(local, _png(_bad(face_image(256, 256))), max_attempts=3)
    attempts = _attempts(done)
    assert len(attempts) >= 2
    first, second = attempts[0], attempts[1]
    changes = json_format.MessageToDict(second.adjustments)
    assert changes["brightness"] > 0.5  # its own brightness, from the measured level
    assert "detail_pass" in changes
    assert second.evaluation.score > first.evaluation.score
    accepted = done.predictions[0].agentic.best_attempt
    assert accepted != 1
    assert done.predictions[0].score == pytest.approx(attempts[accepted - 1].evaluation.score)
    recipe = done.predictions[0].artifact.recipe
    assert recipe.task_type == A.COMPUTE_TASK_TYPE_DETAIL_ENHANCER  # the last pass's output


async def test_an_evaluation_does_not_hold_a_compute_slot(harness: Harness) -> None:
    orchestration = harness.settings.orchestration.model_copy(update={"max_tasks_in_flight": 1})
    harness.settings = harness.settings.model_copy(update={"orchestration": orchestration})
    held = ScriptedEvaluator([0.9])
    held.gate = asyncio.Event()
    stub = await harness.start(held)
    product_id = await harness.product()
    agentic = await stub.CreateGenerateGeneration(agentic_request(product_id))

    async def evaluating() -> bool:
        return len(held.calls) == 1

    await assert_eventually(evaluating)
    # The only compute slot is free while the evaluation waits: a BASE generation runs.
    base = await stub.CreateGenerateGeneration(generate_request(product_id))
    done = await wait_terminal(stub, base.generation.id)
    assert done.status == A.GENERATION_STATUS_COMPLETED
    held.gate.set()
    finished = await wait_terminal(stub, agentic.generation.id)
    assert finished.status == A.GENERATION_STATUS_COMPLETED


async def test_expectations_are_bounded(harness: Harness) -> None:
    stub = await harness.start()
    request = agentic_request(await harness.product())
    request.orchestration.agentic.expectations.view_angle = "x" * 201
    request.orchestration.agentic.expectations.instructions = "y" * 2001
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateGenerateGeneration(request)
    assert set(field_violations(caught.value)) == {
        "orchestration.agentic.expectations.view_angle",
        "orchestration.agentic.expectations.instructions",
    }


async def test_the_deadline_covers_every_attempt(harness: Harness) -> None:
    stub = await harness.start(ScriptedEvaluator([0.2]))
    request = agentic_request(await harness.product(), max_attempts=10)
    request.timeout.seconds = 1
    harness.compute.hold = True
    created = await stub.CreateGenerateGeneration(request)
    await wait_submitted(harness.compute, 1)
    harness.compute.complete(next(iter(harness.compute.tasks)))  # attempt 1 scores 0.2
    done = await wait_terminal(stub, created.generation.id)
    assert done.status == A.GENERATION_STATUS_FAILED
    assert done.error.reason == "DEADLINE_EXCEEDED"
    attempts = _attempts(done)
    assert attempts[0].status == A.ATTEMPT_STATUS_EVALUATED
    assert attempts[-1].status == A.ATTEMPT_STATUS_CANCELLED  # attempt 2 was in flight
    assert done.predictions[0].agentic.stop_reason == A.STOP_REASON_CANCELLED
    assert harness.compute.cancelled  # its task was released
