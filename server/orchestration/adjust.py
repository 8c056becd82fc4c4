"""AGENTIC adjustment: the next attempt's seed, parameter changes and chain, from an evaluation.

Every retry gets a new seed. The previous attempt's per-criterion scores (and the raw
measures behind them) then move levers, each within its bounds:

* sharpness: a DETAIL_ENHANCER pass after the chain, 0.6 and then 0.2 stronger each time
  up to 1; GENERATE also asks for 15 more ``steps``, up to 150 (a lever for a diffusion
  backend; the local one's sharpening does not depend on it).
* exposure, judged on the mean level the output actually reached (outside 0.35-0.65, or
  a low exposure score): the brightness that brings the level to 0.45, within -0.6..1;
  what brightness cannot give at its bound goes to gamma (0.25-4, an IMAGE_ADJUSTER task
  parameter). IMAGE_ADJUSTING changes its own values; the other image strategies add an
  IMAGE_ADJUSTER pass.
* contrast: contrast +0.3, up to 1, the same way.
* noise: REFINE raises ``upscale_denoise`` by 0.2, up to 1.
* face (expected, none found): GENERATE adds prompt emphasis on a visible face.
* fidelity: FACE_FIXING lowers ``strength`` to 70%, down to 0.1.

Those are the findings, criteria below 0.6. When none of them can move a lever (none
found, or each at its bound) the criteria short of 0.9 are taken the same way: the score
was below the threshold, so the next lever is tried before the loop gives up.
A lever already at its bound is named "at its limit" in the reason and moves no more.
Changes are cumulative and relative to the request: attempt 3 keeps attempt 2's changes
and adds its own. VIDEO outputs take no passes (a pass works on an image), so a VIDEO
retry changes the seed only. A failed attempt (no evaluation) is retried with a new seed
and the changes it had.

``repeated`` finds an earlier attempt whose chain computed what a planned one would: the
same task types and parameters, the seed left out for task types whose processors ignore
it (``SEED_FREE``). The workflow does not run such an attempt.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from server.compute.processors.adjust import MAX_GAMMA, MIN_GAMMA
from server.compute.processors.tasks import SEED_FREE
from server.domain.enums import AttemptStatus, Strategy, TaskType
from server.domain.model import Attempt, PlannedStep
from server.evaluation.local import LEVEL_BAND
from server.strategies.common import MAX_SEED

LOW = 0.6
GOOD = 0.9  # below this a criterion still has room, once the findings are exhausted
TARGET_LEVEL = 0.45
MAX_STEPS = 150
STEPS_INCREMENT = 15
FIRST_DETAIL_STRENGTH = 0.6
MAX_DETAIL_STRENGTH = 1.0
MIN_BRIGHTNESS, MAX_BRIGHTNESS = -0.6, 1.0  # within the contract's -1..1 (-1 is black)
MAX_CONTRAST = 1.0
MAX_DENOISE = 1.0
MIN_STRENGTH = 0.1
FACE_EMPHASIS = "face clearly visible, looking at the camera"
# Corrective passes a retry may append to a chain (exposure, then detail).
MAX_PASSES = 2


@dataclass(frozen=True, slots=True)
class Retry:
    """What the next attempt runs and why."""

    seed: int
    adjustments: dict[str, Any]
    reason: str
    steps: list[PlannedStep]


def next_seed(first_seed: int, number: int) -> int:
    """Attempt ``number``'s seed: new for every attempt, reproducible from the first."""
    digest = hashlib.sha256(f"{first_seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (MAX_SEED + 1)


def plan_retry(
    strategy: Strategy,
    plan: list[PlannedStep],
    previous: Attempt,
    number: int,
    first_seed: int,
) -> Retry:
    """The next attempt after ``previous``: its seed, cumulative changes, reason and chain."""
    seed = next_seed(first_seed, number)
    adjustments = dict(previous.adjustments)
    evaluation = previous.evaluation
    if evaluation is None:
        why = previous.error.message if previous.error is not None else "no evaluation"
        reason = f"attempt {previous.number} failed ({why}): new seed"
        return Retry(seed, adjustments, reason, apply(strategy, plan, adjustments, seed))
    request, criteria, measures = plan[0].params, evaluation.criteria, evaluation.measures
    reasons = _adjust(strategy, request, adjustments, criteria, measures, LOW)
    head = f"attempt {previous.number} scored {evaluation.score:.2f}"
    if adjustments == previous.adjustments:
        nearer = dict(previous.adjustments)
        more = _adjust(strategy, request, nearer, criteria, measures, GOOD)
        if nearer != previous.adjustments:
            adjustments = nearer
            found = "no finding can move a lever" if reasons else "no finding"
            reasons = [f"{found}; short of {GOOD}: {more[0]}", *more[1:]]
    if reasons:
        reason = f"{head}: " + "; ".join(reasons) + "; new seed"
    else:
        reason = f"{head}; no criterion points at a parameter: new seed only"
    return Retry(seed, adjustments, reason, apply(strategy, plan, adjustments, seed))


def repeated(
    strategy: Strategy, plan: list[PlannedStep], steps: list[PlannedStep], earlier: list[Attempt]
) -> Attempt | None:
    """The first evaluated attempt of ``earlier`` whose chain computed what ``steps`` would.

    An attempt's chain is ``apply(plan, its adjustments, its seed)``; a failed attempt
    produced nothing to compare and never counts.
    """
    wanted = _computes(steps)
    for attempt in earlier:
        if attempt.status is not AttemptStatus.EVALUATED:
            continue
        if _computes(apply(strategy, plan, attempt.adjustments, attempt.seed)) == wanted:
            return attempt
    return None


def _computes(steps: Iterable[PlannedStep]) -> list[tuple[TaskType, dict[str, Any]]]:
    """What a chain computes: its task types and parameters, less seeds nothing reads."""
    return [
        (
            step.task_type,
            {
                k: v
                for k, v in step.params.items()
                if not (k == "seed" and step.task_type in SEED_FREE)
            },
        )
        for step in steps
    ]


def _adjust(
    strategy: Strategy,
    request: dict[str, Any],
    adjustments: dict[str, Any],
    criteria: dict[str, float],
    measures: dict[str, float],
    threshold: float,
) -> list[str]:
    """Update ``adjustments`` from the criteria below ``threshold``; a reason for each."""
    reasons: list[str] = []
    image_output = strategy is not Strategy.VIDEO

    def low(name: str) -> bool:
        return criteria.get(name, 1.0) < threshold

    if low("sharpness") and image_output:
        reasons.append(_sharpen(strategy, request, adjustments, criteria["sharpness"]))
    if image_output:
        reasons += _tone(strategy, request, adjustments, criteria, measures, threshold)
    if low("noise") and strategy is Strategy.REFINE:
        current = float(adjustments.get("upscale_denoise", request.get("upscale_denoise") or 0.0))
        change = _raise("upscale_denoise", current, 0.2, MAX_DENOISE)
        adjustments["upscale_denoise"] = round(min(MAX_DENOISE, current + 0.2), 3)
        reasons.append(f"noisy (noise {criteria['noise']:.2f}): {change}")
    if low("face") and strategy is Strategy.GENERATE:
        adjustments["prompt_emphasis"] = FACE_EMPHASIS
        reasons.append("no face found: prompt emphasis on the face")
    if low("fidelity") and strategy is Strategy.FACE_FIXING:
        current = float(adjustments.get("strength", request["strength"]))
        if current <= MIN_STRENGTH:
            change = f"strength at its limit ({MIN_STRENGTH:g})"
        else:
            adjustments["strength"] = round(max(MIN_STRENGTH, current * 0.7), 3)
            change = f"strength {adjustments['strength']:.2f}"
        reasons.append(f"changed too much outside the faces: {change}")
    return reasons


def _raise(name: str, current: float, step: float, bound: float) -> str:
    """The words for raising lever ``name`` by ``step`` up to ``bound``."""
    if current >= bound:
        return f"{name} at its limit ({bound:g})"
    return f"{name} {min(bound, current + step):.1f}"


def _sharpen(
    strategy: Strategy, request: dict[str, Any], adjustments: dict[str, Any], score: float
) -> str:
    """A stronger detail pass (and more GENERATE steps), each up to its bound."""
    strength = adjustments.get("detail_pass")
    if strength is None:
        change = f"detail pass {FIRST_DETAIL_STRENGTH:.1f}"
        adjustments["detail_pass"] = FIRST_DETAIL_STRENGTH
    else:
        change = _raise("detail pass", float(strength), 0.2, MAX_DETAIL_STRENGTH)
        adjustments["detail_pass"] = round(min(MAX_DETAIL_STRENGTH, float(strength) + 0.2), 3)
    if strategy is Strategy.GENERATE:
        steps = int(adjustments.get("steps", request["steps"]))
        if steps >= MAX_STEPS:
            change += f", steps at its limit ({MAX_STEPS})"
        else:
            adjustments["steps"] = min(MAX_STEPS, steps + STEPS_INCREMENT)
            change += f", steps {adjustments['steps']}"
    return f"soft (sharpness {score:.2f}): {change}"


def _tone(
    strategy: Strategy,
    request: dict[str, Any],
    adjustments: dict[str, Any],
    criteria: dict[str, float],
    measures: dict[str, float],
    threshold: float,
) -> list[str]:
    """Exposure and contrast changes, folded into the adjustments.

    IMAGE_ADJUSTING changes its own values (brightness composes multiplicatively, as the
    proto defines it: f = 1 + v); the others keep one IMAGE_ADJUSTER pass's values.
    """
    own = strategy is Strategy.IMAGE_ADJUSTING
    current: dict[str, float] = (
        {k: float(adjustments.get(k, request.get(k) or 0.0)) for k in ("brightness", "contrast")}
        if own
        else dict(adjustments.get("exposure_pass", {"brightness": 0.0, "contrast": 0.0}))
    )
    if own and "gamma" in adjustments:
        current["gamma"] = float(adjustments["gamma"])
    reasons: list[str] = []
    level = measures.get("mean_level")
    exposure = criteria.get("exposure", 1.0)
    if level is not None and (exposure < threshold or not LEVEL_BAND[0] <= level <= LEVEL_BAND[1]):
        changes = _expose(current, max(0.02, level))
        if changes:
            reasons.append(
                f"exposure {exposure:.2f} (mean level {level:.2f}): "
                f"{changes} for a {TARGET_LEVEL} level"
            )
    if criteria.get("contrast", 1.0) < threshold:
        change = _raise("contrast", current["contrast"], 0.3, MAX_CONTRAST)
        current["contrast"] = round(min(MAX_CONTRAST, current["contrast"] + 0.3), 3)
        reasons.append(f"flat (contrast {criteria['contrast']:.2f}): {change}")
    if not reasons:
        return reasons
    if own:
        adjustments.update(current)
    else:
        adjustments["exposure_pass"] = current
    return reasons


def _expose(current: dict[str, float], level: float) -> str:
    """Move brightness, then gamma once brightness is at its bound, toward the target level.

    ``level`` is what the output reached with ``current``; the factor still wanted is
    target / level. Gamma g maps a level p to p ** (1 / g), so the level before it is
    level ** g, and the gamma that takes that (times the new brightness change) to the
    target is log(before) / log(target).
    """
    want = TARGET_LEVEL / level
    before = current["brightness"]
    after = round(min(MAX_BRIGHTNESS, max(MIN_BRIGHTNESS, (1.0 + before) * want - 1.0)), 3)
    achieved = (1.0 + after) / (1.0 + before)
    current["brightness"] = after
    limited = abs(achieved / want - 1.0) > 0.02
    parts = []
    if after != before:
        parts.append(f"brightness {after:.2f}" + (" (at its limit)" if limited else ""))
    elif limited:
        parts.append(f"brightness at its limit ({after:g})")
    if not limited:
        return ", ".join(parts)
    gamma = current.get("gamma", 1.0)
    start = level**gamma * achieved
    if 0.0 < start < 1.0:
        wanted = math.log(start) / math.log(TARGET_LEVEL)
        new = round(min(MAX_GAMMA, max(MIN_GAMMA, wanted)), 3)
        if new != round(gamma, 3):
            current["gamma"] = new
            parts.append(f"gamma {new:.2f}")
            return ", ".join(parts)
    parts.append(f"gamma at its limit ({gamma:g})")
    return ", ".join(parts)


def apply(
    strategy: Strategy, plan: list[PlannedStep], adjustments: dict[str, Any], seed: int
) -> list[PlannedStep]:
    """The chain of an attempt: the plan with ``adjustments`` and ``seed``, then its passes."""
    steps: list[PlannedStep] = []
    for index, step in enumerate(plan):
        params = dict(step.params)
        if index == 0:
            for key in ("steps", "brightness", "contrast", "upscale_denoise", "strength"):
                if key in adjustments and key in params:
                    params[key] = adjustments[key]
            if "gamma" in adjustments and step.task_type is TaskType.IMAGE_ADJUSTER:
                params["gamma"] = adjustments["gamma"]  # a task parameter, not a request field
            emphasis = adjustments.get("prompt_emphasis")
            if emphasis and "prompt" in params:
                params["prompt"] = (
                    f"{params['prompt']}, {emphasis}" if params["prompt"] else emphasis
                )
        if "seed" in params:
            params["seed"] = seed
        steps.append(PlannedStep(step.task_type, params))
    exposure = adjustments.get("exposure_pass")
    if exposure is not None and strategy is not Strategy.IMAGE_ADJUSTING:
        params = {
            "base_image": f"step:{len(steps) - 1}",
            "brightness": exposure["brightness"],
            "contrast": exposure["contrast"],
            "saturation": 0.0,
            "prompt": "",
            "seed": seed,
        }
        if "gamma" in exposure:
            params["gamma"] = exposure["gamma"]
        steps.append(PlannedStep(TaskType.IMAGE_ADJUSTER, params))
    detail = adjustments.get("detail_pass")
    if detail is not None:
        params = {"base_image": f"step:{len(steps) - 1}", "strength": detail, "seed": seed}
        steps.append(PlannedStep(TaskType.DETAIL_ENHANCER, params))
    return steps
