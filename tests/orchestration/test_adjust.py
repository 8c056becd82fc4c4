"""The AGENTIC adjustment policy: from an evaluation to the next attempt's chain."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from server.domain.enums import AttemptStatus, Strategy, TaskType
from server.domain.model import Attempt, Evaluation, PlannedStep, ResourceError
from server.orchestration.adjust import next_seed, plan_retry

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _attempt(
    criteria: dict[str, float] | None,
    measures: dict[str, float] | None = None,
    adjustments: dict[str, Any] | None = None,
    number: int = 1,
) -> Attempt:
    evaluation = None
    if criteria is not None:
        evaluation = Evaluation(0.3, criteria, "", "local", measures or {})
    return Attempt(
        id="a",
        prediction_id="p",
        number=number,
        status=AttemptStatus.EVALUATED if evaluation else AttemptStatus.FAILED,
        seed=7,
        created_at=NOW,
        adjustments=adjustments or {},
        evaluation=evaluation,
        error=None if evaluation else ResourceError.evaluation_failed("boom"),
    )


GENERATE = [PlannedStep(TaskType.GENERATION, {"prompt": "a dress", "steps": 30, "seed": 7})]
ADJUST = [
    PlannedStep(
        TaskType.IMAGE_ADJUSTER,
        {"base_image": "artifact:x", "brightness": 0.0, "contrast": 0.0, "seed": 7},
    )
]


def test_every_retry_has_a_new_reproducible_seed() -> None:
    seeds = [next_seed(7, n) for n in range(2, 12)]
    assert len(set(seeds)) == len(seeds)
    assert seeds == [next_seed(7, n) for n in range(2, 12)]
    retry = plan_retry(Strategy.GENERATE, GENERATE, _attempt({"sharpness": 0.9}), 2, 7)
    assert retry.steps[0].params["seed"] == retry.seed == next_seed(7, 2)
    assert retry.adjustments == {}
    assert "new seed only" in retry.reason


def test_soft_output_gets_a_detail_pass_and_more_steps() -> None:
    retry = plan_retry(Strategy.GENERATE, GENERATE, _attempt({"sharpness": 0.2}), 2, 7)
    assert retry.adjustments == {"detail_pass": 0.6, "steps": 45}
    assert [s.task_type for s in retry.steps] == [TaskType.GENERATION, TaskType.DETAIL_ENHANCER]
    assert retry.steps[0].params["steps"] == 45
    assert retry.steps[1].params["base_image"] == "step:0"
    again = plan_retry(
        Strategy.GENERATE,
        GENERATE,
        _attempt({"sharpness": 0.3}, adjustments=retry.adjustments),
        3,
        7,
    )
    assert again.adjustments == {"detail_pass": 0.8, "steps": 60}  # cumulative


def test_exposure_brings_the_mean_level_to_the_target() -> None:
    dark = _attempt({"exposure": 0.2}, {"mean_level": 0.3})
    own = plan_retry(Strategy.IMAGE_ADJUSTING, ADJUST, dark, 2, 7)
    assert own.adjustments == {"brightness": 0.5, "contrast": 0.0}
    assert own.steps[0].params["brightness"] == 0.5
    assert len(own.steps) == 1  # IMAGE_ADJUSTING changes its own values, no pass
    passes = plan_retry(Strategy.GENERATE, GENERATE, dark, 2, 7)
    assert passes.adjustments == {"exposure_pass": {"brightness": 0.5, "contrast": 0.0}}
    assert passes.steps[1].task_type is TaskType.IMAGE_ADJUSTER
    assert passes.steps[1].params["brightness"] == 0.5
    brighter = plan_retry(
        Strategy.IMAGE_ADJUSTING,
        ADJUST,
        _attempt({"exposure": 0.4}, {"mean_level": 0.36}, adjustments=own.adjustments),
        3,
        7,
    )
    assert brighter.adjustments["brightness"] == pytest.approx(0.875)  # 1.5 x 1.25 - 1


def test_video_retries_change_the_seed_only() -> None:
    plan = [PlannedStep(TaskType.VIDEO_GENERATION, {"base_image": "artifact:x", "seed": 7})]
    retry = plan_retry(
        Strategy.VIDEO,
        plan,
        _attempt({"sharpness": 0.1, "exposure": 0.1}, {"mean_level": 0.1}),
        2,
        7,
    )
    assert retry.adjustments == {}
    assert len(retry.steps) == 1


def test_missing_face_fidelity_and_noise_change_their_parameters() -> None:
    generate = plan_retry(Strategy.GENERATE, GENERATE, _attempt({"face": 0.0}), 2, 7)
    assert generate.steps[0].params["prompt"].startswith("a dress, face clearly visible")
    face_plan = [
        PlannedStep(TaskType.FACE_ENHANCER, {"base_image": "x", "strength": 0.8, "seed": 1})
    ]
    face = plan_retry(Strategy.FACE_FIXING, face_plan, _attempt({"fidelity": 0.3}), 2, 7)
    assert face.steps[0].params["strength"] == pytest.approx(0.56)
    refine_plan = [
        PlannedStep(TaskType.REFINE, {"base_image": "x", "upscale_denoise": None, "seed": 1})
    ]
    refine = plan_retry(Strategy.REFINE, refine_plan, _attempt({"noise": 0.2}), 2, 7)
    assert refine.steps[0].params["upscale_denoise"] == pytest.approx(0.2)


def test_a_failed_attempt_keeps_its_changes_and_says_why() -> None:
    failed = _attempt(None, adjustments={"steps": 45}, number=2)
    retry = plan_retry(Strategy.GENERATE, GENERATE, failed, 3, 7)
    assert retry.adjustments == {"steps": 45}
    assert retry.reason == "attempt 2 failed (boom): new seed"
    assert retry.steps[0].params["steps"] == 45
