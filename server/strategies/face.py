"""FACE_FIXING: detect the faces of an image and enhance them."""

from __future__ import annotations

from typing import Any

from server.domain.enums import Strategy, TaskType
from server.domain.errors import Violations
from server.strategies.base import FieldLimit, ImageStrategy, Lookups, Plan, expect_input
from server.strategies.common import MAX_SEED, check_length, check_range, check_seed
from server.strategies.images import check_image, one_task_on_base
from server.strategies.inputs import FaceFixingInput

DEFAULT_STRENGTH = 0.5


class FaceFixingStrategy(ImageStrategy):
    """Validation and planning of FACE_FIXING: one prediction, one FACE_ENHANCER task."""

    strategy = Strategy.FACE_FIXING
    limits: tuple[FieldLimit, ...] = (
        FieldLimit("params.strength", 0, 1),
        FieldLimit("params.seed", 0, MAX_SEED),
    )

    def normalize(self, raw: Any, v: Violations, *, agentic: bool) -> dict[str, Any]:
        """Check every FACE_FIXING field and return the stored parameters."""
        given = expect_input(raw, FaceFixingInput, self.strategy)
        check_image(v, self._policy, "params.base_image_url", given.base_image_url, required=True)
        strength = DEFAULT_STRENGTH if given.strength is None else given.strength
        check_range(v, "params.strength", strength, 0, 1)
        check_length(v, "params.prompt", given.prompt, 2000)
        check_seed(v, "params.seed", given.seed)
        return {
            "base_image_url": given.base_image_url,
            "strength": strength,
            "prompt": given.prompt,
            "seed": given.seed,
        }

    async def plan(self, lookups: Lookups, org: str, params: dict[str, Any]) -> Plan:
        """Resolve the image; one task enhancing its faces."""
        return await one_task_on_base(
            lookups,
            org,
            self._policy,
            params,
            TaskType.FACE_ENHANCER,
            strength=params["strength"],
            prompt=params["prompt"],
        )
