"""EDITING: composite, swap the subject of, or enhance the product in an existing image."""

from __future__ import annotations

from typing import Any

from server.domain.enums import CatalogKind, EditingTool, Strategy, TaskType
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
from server.strategies.common import MAX_SEED, check_dimension, check_length, check_seed
from server.strategies.entities import reference_set
from server.strategies.images import check_image, choose_seed, resolve_inputs
from server.strategies.inputs import EditingInput

MAX_REFERENCES = 8
DETAIL_STRENGTH = 0.5
_ENTITIES = (("subject", CatalogKind.SUBJECT), ("product", CatalogKind.PRODUCT))


class EditingStrategy(ImageStrategy):
    """Validation and planning of EDITING: one prediction, an edit and an optional detail pass."""

    strategy = Strategy.EDITING
    limits: tuple[FieldLimit, ...] = (
        FieldLimit("params.reference_images", 0, MAX_REFERENCES, "image references"),
        FieldLimit("params.width", 64, 4096, "a multiple of 8; 0 keeps the base width"),
        FieldLimit("params.height", 64, 4096, "a multiple of 8; 0 keeps the base height"),
        FieldLimit("params.seed", 0, MAX_SEED),
    )

    def normalize(self, raw: Any, v: Violations, *, agentic: bool) -> dict[str, Any]:
        """Check every EDITING field and return the stored parameters."""
        given = expect_input(raw, EditingInput, self.strategy)
        check_image(v, self._policy, "params.base_img_path", given.base_img_path, required=True)
        if len(given.reference_images) > MAX_REFERENCES:
            v.add(
                "params.reference_images",
                f"must have at most {MAX_REFERENCES} entries, got {len(given.reference_images)}",
            )
        else:
            for index, text in enumerate(given.reference_images):
                field = f"params.reference_images[{index}]"
                check_image(v, self._policy, field, text, required=True)
        if given.tool is None:
            v.add("params.tool", "is required: EDIT, SUBJECT_SWAP or PRODUCT_ENHANCEMENT")
        elif given.tool is EditingTool.EDIT:
            if not given.reference_images and not given.prompt.strip():
                for name in ("params.reference_images", "params.prompt"):
                    v.add(name, "EDIT needs reference images, a prompt, or both")
        elif given.tool is EditingTool.SUBJECT_SWAP and not given.subject_id:
            v.add("params.subject_id", "is required when tool is SUBJECT_SWAP")
        elif given.tool is EditingTool.PRODUCT_ENHANCEMENT and not given.product_id:
            v.add("params.product_id", "is required when tool is PRODUCT_ENHANCEMENT")
        for name, value in (("width", given.width), ("height", given.height)):
            if value:
                check_dimension(v, f"params.{name}", value)
        check_seed(v, "params.seed", given.seed)
        check_length(v, "params.prompt", given.prompt, 4000)
        return {
            "base_img_path": given.base_img_path,
            "reference_images": list(given.reference_images),
            "subject_id": given.subject_id,
            "product_id": given.product_id,
            "tool": None if given.tool is None else given.tool.value,
            "width": given.width,
            "height": given.height,
            "detail_enhancer": given.detail_enhancer,
            "seed": given.seed,
            "prompt": given.prompt,
        }

    async def plan(self, lookups: Lookups, org: str, params: dict[str, Any]) -> Plan:
        """Resolve the images and entities; the edit, then the detail pass when asked."""
        images = {"params.base_img_path": params["base_img_path"]}
        images |= {
            f"params.reference_images[{i}]": text
            for i, text in enumerate(params["reference_images"])
        }
        # Unknown images and entities are reported together: one NOT_FOUND naming each.
        resolved, entities = await resolve_inputs(
            lookups, org, self._policy, images, params, _ENTITIES
        )
        seed = choose_seed(params)
        base = resolved["params.base_img_path"]
        width, height = params["width"], params["height"]
        if base.artifact is not None:  # 0 keeps the base size; known now, so say it
            width = width or base.artifact.width
            height = height or base.artifact.height
        edit = PlannedTask(
            TaskType.EDITING,
            {
                "base_image": base.reference,
                "reference_images": [
                    resolved[f"params.reference_images[{i}]"].reference
                    for i in range(len(params["reference_images"]))
                ],
                "subject": _entity(entities, "subject"),
                "product": _entity(entities, "product"),
                "tool": params["tool"],
                "width": width,
                "height": height,
                "seed": seed,
                "prompt": params["prompt"],
            },
        )
        tasks = [edit]
        if params["detail_enhancer"]:
            detail = {"base_image": "step:0", "strength": DETAIL_STRENGTH, "seed": seed}
            tasks.append(PlannedTask(TaskType.DETAIL_ENHANCER, detail))
        return Plan((PlannedPrediction(seed, tuple(tasks)),))


def _entity(entities: dict[str, Any], name: str) -> dict[str, Any] | None:
    entity = entities.get(name)
    return None if entity is None else reference_set(entity)
