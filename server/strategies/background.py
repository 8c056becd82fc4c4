"""BACKGROUND_FIXING: keep the foreground, replace or clean the background."""

from __future__ import annotations

from typing import Any

from server.domain.enums import Strategy, TaskType
from server.domain.errors import Violations
from server.strategies.base import (
    FieldLimit,
    ImageStrategy,
    Lookups,
    Plan,
    PlannedPrediction,
    PlannedTask,
    expect_input,
)
from server.strategies.common import MAX_SEED, check_length, check_range, check_seed
from server.strategies.images import check_image, choose_seed, resolve_images
from server.strategies.inputs import BackgroundFixingInput

_BASE = "params.base_image_url"
_BACKGROUND = "params.background_image_url"


class BackgroundFixingStrategy(ImageStrategy):
    """Validation and planning of BACKGROUND_FIXING: one prediction, one BACKGROUND_FIX task."""

    strategy = Strategy.BACKGROUND_FIXING
    limits: tuple[FieldLimit, ...] = (
        FieldLimit("params.mask_expansion", 0, 256, "pixels"),
        FieldLimit("params.seed", 0, MAX_SEED),
    )

    def normalize(self, raw: Any, v: Violations, *, agentic: bool) -> dict[str, Any]:
        """Check every BACKGROUND_FIXING field and return the stored parameters."""
        given = expect_input(raw, BackgroundFixingInput, self.strategy)
        check_image(v, self._policy, _BASE, given.base_image_url, required=True)
        check_image(v, self._policy, _BACKGROUND, given.background_image_url, required=False)
        check_length(v, "params.background_prompt", given.background_prompt, 2000)
        if given.background_prompt and given.background_image_url:
            for field in ("params.background_prompt", _BACKGROUND):
                v.add(field, "background_prompt and background_image_url exclude each other")
        check_range(v, "params.mask_expansion", given.mask_expansion, 0, 256, unit=" px")
        check_seed(v, "params.seed", given.seed)
        return {
            "base_image_url": given.base_image_url,
            "background_prompt": given.background_prompt,
            "background_image_url": given.background_image_url,
            "mask_expansion": given.mask_expansion,
            "seed": given.seed,
        }

    async def plan(self, lookups: Lookups, org: str, params: dict[str, Any]) -> Plan:
        """Resolve the image and the new background, if any."""
        images = {_BASE: params["base_image_url"], _BACKGROUND: params["background_image_url"]}
        resolved = await resolve_images(lookups, org, self._policy, images)
        seed = choose_seed(params)
        background = resolved.get(_BACKGROUND)
        task = PlannedTask(
            TaskType.BACKGROUND_FIX,
            {
                "base_image": resolved[_BASE].reference,
                "background_prompt": params["background_prompt"],
                "background_image": "" if background is None else background.reference,
                "mask_expansion": params["mask_expansion"],
                "seed": seed,
            },
        )
        return Plan((PlannedPrediction(seed, (task,)),))
