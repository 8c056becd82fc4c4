"""GENERATE: a studio shot of a subject and/or product, in a style, from the catalog."""

from __future__ import annotations

import secrets
from typing import Any

from server.domain.enums import CatalogKind, Strategy, TaskType
from server.domain.errors import Violations
from server.domain.model import CatalogEntity
from server.strategies.base import (
    FieldLimit,
    Lookups,
    Plan,
    PlannedPrediction,
    PlannedTask,
    expect_input,
)
from server.strategies.common import (
    MAX_SEED,
    check_dimension,
    check_length,
    check_range,
    check_seed,
)
from server.strategies.entities import load_entities, reference_set
from server.strategies.inputs import GenerateInput

DEFAULT_SIZE = 1024
DEFAULT_STEPS = 30
_ENTITIES = (
    ("subject", CatalogKind.SUBJECT),
    ("product", CatalogKind.PRODUCT),
    ("style", CatalogKind.STYLE),
)


class GenerateStrategy:
    """Validation and planning of GENERATE."""

    strategy = Strategy.GENERATE
    limits: tuple[FieldLimit, ...] = (
        FieldLimit("params.batch_size", 1, 16),
        FieldLimit("params.width", 64, 4096, "a multiple of 8"),
        FieldLimit("params.height", 64, 4096, "a multiple of 8"),
        FieldLimit("params.steps", 1, 150),
        FieldLimit("params.seed", 0, MAX_SEED),
        FieldLimit("params.subject_lora_weight", 0, 2),
        FieldLimit("params.product_lora_weight", 0, 2),
        FieldLimit("params.style_lora_weight", 0, 2),
    )

    def normalize(self, raw: Any, v: Violations, *, agentic: bool) -> dict[str, Any]:
        """Check every GENERATE field and return the stored parameters."""
        given = expect_input(raw, GenerateInput, self.strategy)
        batch = given.batch_size or 1
        check_range(v, "params.batch_size", batch, 1, 16)
        if not given.subject_id and not given.product_id:
            v.add("params.subject_id", "subject_id or product_id is required")
            v.add("params.product_id", "subject_id or product_id is required")
        for name, _ in _ENTITIES:
            entity_id = getattr(raw, f"{name}_id")
            weight = getattr(raw, f"{name}_lora_weight")
            if weight is not None:
                check_range(v, f"params.{name}_lora_weight", weight, 0, 2)
                if not entity_id:
                    v.add(f"params.{name}_lora_weight", f"is set but params.{name}_id is not")
        shot = given.shot_type_string.strip()
        check_length(v, "params.shot_type_string", shot, 200, low=1)
        check_length(v, "params.generated_prompt", given.generated_prompt, 4000)
        if given.auto_generate_prompt and given.generated_prompt:
            for field in ("params.auto_generate_prompt", "params.generated_prompt"):
                v.add(field, "auto_generate_prompt and generated_prompt contradict each other")
        check_length(v, "params.negative_prompt", given.negative_prompt, 2000)
        width, height = given.width or DEFAULT_SIZE, given.height or DEFAULT_SIZE
        check_dimension(v, "params.width", width)
        check_dimension(v, "params.height", height)
        check_seed(v, "params.seed", given.seed)
        steps = given.steps or DEFAULT_STEPS
        check_range(v, "params.steps", steps, 1, 150)
        return {
            "batch_size": batch,
            "subject_id": given.subject_id,
            "product_id": given.product_id,
            "style_id": given.style_id,
            "shot_type_string": shot,
            "generated_prompt": given.generated_prompt,
            "auto_generate_prompt": given.auto_generate_prompt,
            "width": width,
            "height": height,
            "seed": given.seed,
            "subject_lora_weight": given.subject_lora_weight,
            "product_lora_weight": given.product_lora_weight,
            "style_lora_weight": given.style_lora_weight,
            "negative_prompt": given.negative_prompt,
            "steps": steps,
        }

    async def plan(self, lookups: Lookups, org: str, params: dict[str, Any]) -> Plan:
        """Load the catalog entities, build the prompt, and plan one task per prediction."""
        entities = await load_entities(lookups, org, params, _ENTITIES)
        references = {
            name: reference_set(entity, params[f"{name}_lora_weight"])
            for name, entity in entities.items()
        }
        if params["seed"] is None:
            params["seed"] = secrets.randbelow(MAX_SEED + 1)
        base = {
            "prompt": build_prompt(params, entities),
            "negative_prompt": params["negative_prompt"],
            "shot_type": params["shot_type_string"],
            "width": params["width"],
            "height": params["height"],
            "steps": params["steps"],
            **{name: references.get(name) for name, _ in _ENTITIES},
        }
        predictions = []
        for index in range(params["batch_size"]):
            seed = (params["seed"] + index) % (MAX_SEED + 1)
            task = PlannedTask(TaskType.GENERATION, {**base, "seed": seed})
            predictions.append(PlannedPrediction(seed, (task,)))
        return Plan(tuple(predictions))


def build_prompt(params: dict[str, Any], entities: dict[str, CatalogEntity]) -> str:
    """The prompt sent to compute.

    ``generated_prompt`` wins when given. Otherwise a template names the entities; with
    ``auto_generate_prompt`` it also weaves in their catalog descriptions (this service
    has no language model, so "generate" means "compose from the catalog").
    """
    if params["generated_prompt"]:
        return str(params["generated_prompt"])
    detailed = bool(params["auto_generate_prompt"])

    def describe(name: str) -> str:
        entity = entities[name]
        if detailed and entity.description:
            return f"{entity.name} ({entity.description})"
        return entity.name

    parts = [f"{params['shot_type_string']} studio fashion photograph"]
    if "subject" in entities:
        parts.append(f"of {describe('subject')}")
    if "product" in entities:
        parts.append(("wearing " if "subject" in entities else "of ") + describe("product"))
    if "style" in entities:
        parts.append(f"in the style of {describe('style')}")
    if detailed:
        parts.append("soft key light, seamless backdrop, high detail, sharp focus")
    return ", ".join([" ".join(parts[:3]), *parts[3:]])
