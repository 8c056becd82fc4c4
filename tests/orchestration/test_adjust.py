"""The AGENTIC adjustment policy: from an evaluation to the next attempt's chain."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import pytest

from server.compute.processors.tasks import SEED_FREE
from server.domain.enums import AttemptStatus, Strategy, TaskType
from server.domain.model import Attempt, Evaluation, PlannedStep, ResourceError
from server.orchestration.adjust import apply, next_seed, plan_retry, repeated

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


# -- levers with limits -------------------------------------------------------------------


def test_brightness_at_its_limit_hands_the_rest_to_gamma() -> None:
    very_dark = _attempt({"exposure": 0.36}, {"mean_level": 0.16})
    retry = plan_retry(Strategy.IMAGE_ADJUSTING, ADJUST, very_dark, 2, 7)
    assert retry.adjustments["brightness"] == 1.0  # x2, the most brightness may give
    # The level before gamma is 0.16 x 2; gamma takes it to 0.45: log(0.32) / log(0.45).
    assert retry.adjustments["gamma"] == pytest.approx(math.log(0.32) / math.log(0.45), abs=1e-3)
    assert retry.steps[0].params["gamma"] == retry.adjustments["gamma"]
    assert "brightness 1.00 (at its limit), gamma 1.43" in retry.reason
    # Still short: brightness stays at its bound, gamma grows from the level reached.
    again = plan_retry(
        Strategy.IMAGE_ADJUSTING,
        ADJUST,
        _attempt({"exposure": 0.8}, {"mean_level": 0.3}, adjustments=retry.adjustments, number=2),
        3,
        7,
    )
    assert again.adjustments["brightness"] == 1.0
    assert again.adjustments["gamma"] > retry.adjustments["gamma"]
    assert "brightness at its limit (1)" in again.reason


def test_exposure_is_judged_on_the_level_reached_not_the_passing_score() -> None:
    # Exposure 0.83 is no finding (>= 0.6), but a 0.30 level is short of the band: it is
    # corrected along with the finding (soft), not left for later.
    short = _attempt({"exposure": 0.83, "sharpness": 0.2}, {"mean_level": 0.3})
    retry = plan_retry(Strategy.IMAGE_ADJUSTING, ADJUST, short, 2, 7)
    assert retry.adjustments["brightness"] == pytest.approx(0.5)
    assert retry.adjustments["detail_pass"] == 0.6
    # Even a score past "good" does not hide a level short of the band.
    nearly = _attempt({"exposure": 0.93}, {"mean_level": 0.33})
    assert plan_retry(Strategy.IMAGE_ADJUSTING, ADJUST, nearly, 2, 7).adjustments["brightness"] > 0
    inside = _attempt({"exposure": 1.0}, {"mean_level": 0.4})
    assert plan_retry(Strategy.IMAGE_ADJUSTING, ADJUST, inside, 2, 7).adjustments == {}


def test_a_pass_carries_gamma_for_the_other_strategies() -> None:
    retry = plan_retry(
        Strategy.GENERATE, GENERATE, _attempt({"exposure": 0.2}, {"mean_level": 0.1}), 2, 7
    )
    (pass_,) = (s for s in retry.steps if s.task_type is TaskType.IMAGE_ADJUSTER)
    assert pass_.params["brightness"] == 1.0
    assert pass_.params["gamma"] == retry.adjustments["exposure_pass"]["gamma"] > 1.0


def test_levers_at_their_limit_are_named_and_move_no_more() -> None:
    spent = {"detail_pass": 1.0, "brightness": 1.0, "contrast": 1.0, "gamma": 4.0}
    retry = plan_retry(
        Strategy.IMAGE_ADJUSTING,
        ADJUST,
        _attempt(
            {"sharpness": 0.2, "contrast": 0.3, "exposure": 0.9}, {"mean_level": 0.2}, spent, 3
        ),
        4,
        7,
    )
    assert retry.adjustments == spent
    for lever in (
        "detail pass at its limit (1)",
        "brightness at its limit (1)",
        "gamma at its limit (4)",
        "contrast at its limit (1)",
    ):
        assert lever in retry.reason


def test_with_no_finding_left_the_criteria_short_of_good_are_taken() -> None:
    nearly = _attempt({"sharpness": 0.7, "exposure": 1.0, "contrast": 0.95}, {"mean_level": 0.45})
    retry = plan_retry(Strategy.IMAGE_ADJUSTING, ADJUST, nearly, 2, 7)
    assert retry.adjustments == {"detail_pass": 0.6}
    assert "no finding; short of 0.9: soft (sharpness 0.70): detail pass 0.6" in retry.reason
    content = _attempt({"sharpness": 0.95, "exposure": 1.0}, {"mean_level": 0.45})
    assert plan_retry(Strategy.IMAGE_ADJUSTING, ADJUST, content, 2, 7).adjustments == {}


# -- attempts that would repeat ---------------------------------------------------------------


def _evaluated(number: int, seed: int, adjustments: dict[str, Any]) -> Attempt:
    attempt = _attempt({"scripted": 0.5}, adjustments=adjustments, number=number)
    attempt.seed = seed
    return attempt


def test_a_chain_that_ignores_the_seed_repeats_with_a_new_seed_alone() -> None:
    first = _evaluated(1, 7, {})
    retry = plan_retry(Strategy.IMAGE_ADJUSTING, ADJUST, first, 2, 7)
    assert retry.seed != 7
    assert repeated(Strategy.IMAGE_ADJUSTING, ADJUST, retry.steps, [first]) is first
    brighter = apply(Strategy.IMAGE_ADJUSTING, ADJUST, {"brightness": 0.5}, retry.seed)
    assert repeated(Strategy.IMAGE_ADJUSTING, ADJUST, brighter, [first]) is None
    # The same changes as an earlier attempt (any seed) are a repeat of that one.
    second = _evaluated(2, 99, {"brightness": 0.5})
    assert repeated(Strategy.IMAGE_ADJUSTING, ADJUST, brighter, [first, second]) is second


def test_a_chain_that_reads_the_seed_is_new_with_every_seed() -> None:
    first = _evaluated(1, 7, {"detail_pass": 0.6})
    same_changes = apply(Strategy.GENERATE, GENERATE, {"detail_pass": 0.6}, next_seed(7, 2))
    assert repeated(Strategy.GENERATE, GENERATE, same_changes, [first]) is None
    same_seed = apply(Strategy.GENERATE, GENERATE, {"detail_pass": 0.6}, 7)
    assert repeated(Strategy.GENERATE, GENERATE, same_seed, [first]) is first


def test_a_failed_attempt_is_never_repeated() -> None:
    failed = _attempt(None)
    steps = apply(Strategy.IMAGE_ADJUSTING, ADJUST, {}, 8)
    assert repeated(Strategy.IMAGE_ADJUSTING, ADJUST, steps, [failed]) is None


def test_seed_free_task_types_are_declared_where_the_processors_are() -> None:
    assert TaskType.IMAGE_ADJUSTER in SEED_FREE
    assert TaskType.GENERATION not in SEED_FREE
