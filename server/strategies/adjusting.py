"""IMAGE_ADJUSTING: global brightness, contrast and saturation, and prompt hints."""

from __future__ import annotations

from typing import Any

from server.domain.enums import Strategy, TaskType
from server.domain.errors import Violations
from server.strategies.base import FieldLimit, ImageStrategy, Lookups, Plan, expect_input
from server.strategies.common import MAX_SEED, check_length, check_range, check_seed
from server.strategies.images import check_image, one_task_on_base
from server.strategies.inputs import ImageAdjustingInput

_ADJUSTMENTS = ("brightness", "contrast", "saturation")


class ImageAdjustingStrategy(ImageStrategy):
    """Validation and planning of IMAGE_ADJUSTING: one prediction, one IMAGE_ADJUSTER task."""

    strategy = Strategy.IMAGE_ADJUSTING
    limits: tuple[FieldLimit, ...] = (
        FieldLimit("params.brightness", -1, 1),
        FieldLimit("params.contrast", -1, 1),
        FieldLimit("params.saturation", -1, 1),
        FieldLimit("params.seed", 0, MAX_SEED),
    )

    def normalize(self, raw: Any, v: Violations, *, agentic: bool) -> dict[str, Any]:
        """Check every IMAGE_ADJUSTING field and return the stored parameters."""
        given = expect_input(raw, ImageAdjustingInput, self.strategy)
        check_image(v, self._policy, "params.base_image_url", given.base_image_url, required=True)
        values = {name: getattr(raw, name) or 0.0 for name in _ADJUSTMENTS}
        for name, value in values.items():
            check_range(v, f"params.{name}", value, -1, 1)
        check_length(v, "params.prompt", given.prompt, 2000)
        if not agentic and not any(values.values()) and not given.prompt.strip():
            for name in (*_ADJUSTMENTS, "prompt"):
                v.add(f"params.{name}", "nothing to adjust: set an adjustment or a prompt")
        check_seed(v, "params.seed", given.seed)
        return {
            "base_image_url": given.base_image_url,
            **values,
            "prompt": given.prompt,
            "seed": given.seed,
        }

    async def plan(self, lookups: Lookups, org: str, params: dict[str, Any]) -> Plan:
        """Resolve the image; one task applying the adjustments."""
        return await one_task_on_base(
            lookups,
            org,
            self._policy,
            params,
            TaskType.IMAGE_ADJUSTER,
            **{name: params[name] for name in _ADJUSTMENTS},
            prompt=params["prompt"],
        )
