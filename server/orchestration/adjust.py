"""AGENTIC adjustment: the next attempt's seed, parameter changes and chain, from an evaluation.

Every retry gets a new seed. The previous attempt's per-criterion scores (and the raw
measures behind them) then choose parameter changes:

* sharpness: a DETAIL_ENHANCER pass after the chain, stronger each time; GENERATE also
  asks for 15 more ``steps`` (a lever for a diffusion backend; the local one's sharpening
  does not depend on it).
* exposure: the brightness that brings the mean level to 0.45. IMAGE_ADJUSTING changes
  its own ``brightness``; the other image strategies add an IMAGE_ADJUSTER pass.
* contrast: contrast +0.3, the same way.
* noise: REFINE raises ``upscale_denoise`` by 0.2.
* face (expected, none found): GENERATE adds prompt emphasis on a visible face.
* fidelity: FACE_FIXING lowers ``strength`` to 70%.

Changes are cumulative and relative to the request: attempt 3 keeps attempt 2's changes
and adds its own. VIDEO outputs take no passes (a pass works on an image), so a VIDEO
retry changes the seed only. A failed attempt (no evaluation) is retried with a new seed
and the changes it had.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from server.domain.enums import Strategy, TaskType
from server.domain.model import Attempt, PlannedStep
from server.strategies.common import MAX_SEED

LOW = 0.6
TARGET_LEVEL = 0.45
MAX_STEPS = 150
STEPS_INCREMENT = 15
FIRST_DETAIL_STRENGTH = 0.6
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
    reasons = _adjust(
        strategy, plan[0].params, adjustments, evaluation.criteria, evaluation.measures
    )
    head = f"attempt {previous.number} scored {evaluation.score:.2f}"
    if reasons:
        reason = f"{head}: " + "; ".join(reasons) + "; new seed"
    else:
        reason = f"{head}; no criterion points at a parameter: new seed only"
    return Retry(seed, adjustments, reason, apply(strategy, plan, adjustments, seed))


def _adjust(
    strategy: Strategy,
    request: dict[str, Any],
    adjustments: dict[str, Any],
    criteria: dict[str, float],
    measures: dict[str, float],
) -> list[str]:
    """Update ``adjustments`` in place from the findings; the reasons, one per change."""
    reasons: list[str] = []
    image_output = strategy is not Strategy.VIDEO

    def low(name: str) -> bool:
        return criteria.get(name, 1.0) < LOW

    if low("sharpness") and image_output:
        strength = adjustments.get("detail_pass")
        strength = FIRST_DETAIL_STRENGTH if strength is None else min(1.0, strength + 0.2)
        adjustments["detail_pass"] = round(strength, 3)
        reasons.append(f"soft (sharpness {criteria['sharpness']:.2f}): detail pass {strength:.1f}")
        if strategy is Strategy.GENERATE:
            steps = min(
                MAX_STEPS, int(adjustments.get("steps", request["steps"])) + STEPS_INCREMENT
            )
            adjustments["steps"] = steps
            reasons[-1] += f", steps {steps}"
    tone: dict[str, float] = {}
    if low("exposure") and image_output and "mean_level" in measures:
        level = max(0.02, measures["mean_level"])
        tone["brightness"] = TARGET_LEVEL / level
        reasons.append(
            f"exposure {criteria['exposure']:.2f} (mean level {level:.2f}): "
            f"brightness for a {TARGET_LEVEL} level"
        )
    if low("contrast") and image_output:
        tone["contrast"] = 0.3
        reasons.append(f"flat (contrast {criteria['contrast']:.2f}): contrast +0.3")
    if tone:
        _apply_tone(strategy, request, adjustments, tone)
    if low("noise") and strategy is Strategy.REFINE:
        denoise = min(
            1.0,
            float(adjustments.get("upscale_denoise", request.get("upscale_denoise") or 0.0)) + 0.2,
        )
        adjustments["upscale_denoise"] = round(denoise, 3)
        reasons.append(f"noisy (noise {criteria['noise']:.2f}): upscale_denoise {denoise:.1f}")
    if low("face") and strategy is Strategy.GENERATE:
        adjustments["prompt_emphasis"] = FACE_EMPHASIS
        reasons.append("no face found: prompt emphasis on the face")
    if low("fidelity") and strategy is Strategy.FACE_FIXING:
        strength = max(0.1, float(adjustments.get("strength", request["strength"])) * 0.7)
        adjustments["strength"] = round(strength, 3)
        reasons.append(f"changed too much outside the faces: strength {strength:.2f}")
    return reasons


def _apply_tone(
    strategy: Strategy,
    request: dict[str, Any],
    adjustments: dict[str, Any],
    tone: dict[str, float],
) -> None:
    """Fold a brightness factor and a contrast step into the adjustments.

    IMAGE_ADJUSTING changes its own values (brightness composes multiplicatively, as
    the proto defines it: f = 1 + v); the others keep one IMAGE_ADJUSTER pass's values.
    """
    own = strategy is Strategy.IMAGE_ADJUSTING
    current: dict[str, float] = (
        {k: float(adjustments.get(k, request.get(k) or 0.0)) for k in ("brightness", "contrast")}
        if own
        else dict(adjustments.get("exposure_pass", {"brightness": 0.0, "contrast": 0.0}))
    )
    if "brightness" in tone:
        factor = (1.0 + current["brightness"]) * tone["brightness"]
        current["brightness"] = round(min(1.0, max(-0.6, factor - 1.0)), 3)
    if "contrast" in tone:
        current["contrast"] = round(min(1.0, current["contrast"] + tone["contrast"]), 3)
    if own:
        adjustments.update(current)
    else:
        adjustments["exposure_pass"] = current


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
        steps.append(PlannedStep(TaskType.IMAGE_ADJUSTER, params))
    detail = adjustments.get("detail_pass")
    if detail is not None:
        params = {"base_image": f"step:{len(steps) - 1}", "strength": detail, "seed": seed}
        steps.append(PlannedStep(TaskType.DETAIL_ENHANCER, params))
    return steps
