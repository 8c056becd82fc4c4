"""REFINE: upscale an image in stages and/or refine its faces; keeps a ``Refine`` record."""

from __future__ import annotations

from typing import Any

from server.domain.enums import Strategy, TaskType
from server.domain.errors import InvalidArgumentError, Violations
from server.domain.model import Refine
from server.domain.sizes import MAX_SIDE, refine_output_size
from server.strategies.base import (
    FieldLimit,
    ImageStrategy,
    Lookups,
    Plan,
    PlannedPrediction,
    PlannedTask,
    expect_input,
)
from server.strategies.common import MAX_SEED, check_dimension, check_range, check_seed
from server.strategies.images import check_image, choose_seed, resolve_base
from server.strategies.inputs import RefineInput

DEFAULT_FACTOR = 2.0
DEFAULT_STEPS = 2
DEFAULT_DENOISE = 0.3
DEFAULT_FACE_STEPS = 10
_BASE = "params.base_image_url"


class RefineStrategy(ImageStrategy):
    """Validation and planning of REFINE: one REFINE task per prediction."""

    strategy = Strategy.REFINE
    limits: tuple[FieldLimit, ...] = (
        FieldLimit("params.batch_size", 1, 16),
        FieldLimit("params.target_width", 64, 4096, "a multiple of 8; 0 derives it"),
        FieldLimit("params.target_height", 64, 4096, "a multiple of 8; 0 derives it"),
        FieldLimit("params.upscale_factor", 1, 4),
        FieldLimit("params.upscale_steps", 1, 10),
        FieldLimit("params.upscale_denoise", 0, 1),
        FieldLimit("params.face_detail_steps", 1, 50),
        FieldLimit("params.seed", 0, MAX_SEED),
    )

    def normalize(self, raw: Any, v: Violations, *, agentic: bool) -> dict[str, Any]:
        """Check every REFINE field and return the stored parameters."""
        given = expect_input(raw, RefineInput, self.strategy)
        check_image(v, self._policy, _BASE, given.base_image_url, required=True)
        batch = given.batch_size or 1
        check_range(v, "params.batch_size", batch, 1, 16)
        for name, value in (
            ("target_width", given.target_width),
            ("target_height", given.target_height),
        ):
            if value:
                check_dimension(v, f"params.{name}", value)
        if not given.upscale_enabled and not given.face_detail_enabled:
            for field in ("params.upscale_enabled", "params.face_detail_enabled"):
                v.add(field, "at least one of upscale_enabled and face_detail_enabled must be true")
        factor = given.upscale_factor or DEFAULT_FACTOR
        check_range(v, "params.upscale_factor", factor, 1, 4)
        steps = given.upscale_steps or DEFAULT_STEPS
        check_range(v, "params.upscale_steps", steps, 1, 10)
        denoise = DEFAULT_DENOISE if given.upscale_denoise is None else given.upscale_denoise
        check_range(v, "params.upscale_denoise", denoise, 0, 1)
        face_steps = given.face_detail_steps or DEFAULT_FACE_STEPS
        check_range(v, "params.face_detail_steps", face_steps, 1, 50)
        check_seed(v, "params.seed", given.seed)
        return {
            "base_image_url": given.base_image_url,
            "batch_size": batch,
            "target_width": given.target_width,
            "target_height": given.target_height,
            "upscale_enabled": given.upscale_enabled,
            "upscale_factor": factor,
            "upscale_steps": steps,
            "upscale_denoise": denoise,
            "face_detail_enabled": given.face_detail_enabled,
            "face_detail_steps": face_steps,
            "seed": given.seed,
        }

    async def plan(self, lookups: Lookups, org: str, params: dict[str, Any]) -> Plan:
        """Resolve the input, derive the output size when possible, one task per variant.

        Raises:
            InvalidArgumentError: the derived output size exceeds the limit.
        """
        base = await resolve_base(lookups, org, self._policy, params)
        artifact = base.artifact
        width, height = _output_size(
            params, artifact.width if artifact else 0, artifact.height if artifact else 0
        )
        seed = choose_seed(params)
        record = Refine(
            base_image_url=params["base_image_url"],
            upscale_enabled=params["upscale_enabled"],
            upscale_factor=params["upscale_factor"],
            upscale_steps=params["upscale_steps"],
            upscale_denoise=params["upscale_denoise"],
            face_detail_enabled=params["face_detail_enabled"],
            face_detail_steps=params["face_detail_steps"],
            base_image_sha256=artifact.sha256 if artifact else "",
            base_width=artifact.width if artifact else 0,
            base_height=artifact.height if artifact else 0,
            output_width=width,
            output_height=height,
        )
        task = {
            "base_image": base.reference,
            **{
                name: params[name]
                for name in (
                    "target_width",
                    "target_height",
                    "upscale_enabled",
                    "upscale_factor",
                    "upscale_steps",
                    "upscale_denoise",
                    "face_detail_enabled",
                    "face_detail_steps",
                )
            },
        }
        predictions = []
        for index in range(params["batch_size"]):
            variant = (seed + index) % (MAX_SEED + 1)
            planned = PlannedTask(TaskType.REFINE, {**task, "seed": variant})
            predictions.append(PlannedPrediction(variant, (planned,)))
        return Plan(tuple(predictions), refinement=record)


def _output_size(params: dict[str, Any], base_width: int, base_height: int) -> tuple[int, int]:
    """The output size when it can be known now (else 0, 0); refused above the limit."""
    targets = params["target_width"], params["target_height"]
    if not base_width and not all(targets):
        return 0, 0  # derived from an input fetched later, when the task runs
    width, height = refine_output_size(
        base_width or 1,
        base_height or 1,
        target_width=targets[0],
        target_height=targets[1],
        upscale_enabled=params["upscale_enabled"],
        upscale_factor=params["upscale_factor"],
    )
    v = Violations()
    names = ("target_width", "target_height")
    set_targets = [f"params.{n}" for n, t in zip(names, targets, strict=True) if t]
    for name, side, target in zip(("width", "height"), (width, height), targets, strict=True):
        if side > MAX_SIDE:
            # Blame what the side came from: its target, the other target, or the factor.
            field = (
                f"params.target_{name}"
                if target
                else next(iter(set_targets), "params.upscale_factor")
            )
            v.add(
                field,
                f"the output would be {width}x{height} for a {base_width}x{base_height} "
                f"input; each side must be at most {MAX_SIDE}",
            )
    if v:
        raise InvalidArgumentError(v.items)
    return width, height
