"""VIDEO: a short H.264 clip with camera motion over a still."""

from __future__ import annotations

from typing import Any

from server.domain.enums import Strategy, TaskType
from server.domain.errors import Violations
from server.strategies.base import FieldLimit, ImageStrategy, Lookups, Plan, expect_input
from server.strategies.common import MAX_SEED, check_range, check_seed
from server.strategies.images import check_image, one_task_on_base
from server.strategies.inputs import VideoInput

DEFAULT_MOTION = 127
DEFAULT_FPS = 24
DEFAULT_DURATION_S = 3.0


class VideoStrategy(ImageStrategy):
    """Validation and planning of VIDEO: one prediction, one VIDEO_GENERATION task."""

    strategy = Strategy.VIDEO
    limits: tuple[FieldLimit, ...] = (
        FieldLimit("params.motion_bucket_id", 1, 255),
        FieldLimit("params.fps", 1, 60),
        FieldLimit("params.duration", 0.5, 30, "seconds"),
        FieldLimit("params.seed", 0, MAX_SEED),
    )

    def normalize(self, raw: Any, v: Violations, *, agentic: bool) -> dict[str, Any]:
        """Check every VIDEO field and return the stored parameters (duration in seconds)."""
        given = expect_input(raw, VideoInput, self.strategy)
        check_image(v, self._policy, "params.base_image_url", given.base_image_url, required=True)
        v.extend(given.problems)
        motion = given.motion_bucket_id or DEFAULT_MOTION
        check_range(v, "params.motion_bucket_id", motion, 1, 255)
        fps = given.fps or DEFAULT_FPS
        check_range(v, "params.fps", fps, 1, 60)
        duration = DEFAULT_DURATION_S if given.duration_s is None else given.duration_s
        if not given.problems:
            check_range(v, "params.duration", duration, 0.5, 30, unit=" s")
        check_seed(v, "params.seed", given.seed)
        return {
            "base_image_url": given.base_image_url,
            "motion_bucket_id": motion,
            "fps": fps,
            "duration": duration,
            "seed": given.seed,
        }

    async def plan(self, lookups: Lookups, org: str, params: dict[str, Any]) -> Plan:
        """Resolve the still; one task rendering round(fps x duration) frames."""
        return await one_task_on_base(
            lookups,
            org,
            self._policy,
            params,
            TaskType.VIDEO_GENERATION,
            motion_bucket_id=params["motion_bucket_id"],
            fps=params["fps"],
            duration_s=params["duration"],
        )
