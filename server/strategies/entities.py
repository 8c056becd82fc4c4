"""Catalog entities a request names: loaded together, sent to compute as reference sets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.domain.enums import CatalogKind
from server.domain.errors import NotFoundError
from server.domain.model import CatalogEntity
from server.strategies.base import Lookups

DEFAULT_LORA_WEIGHT = 0.8


async def load_entities(
    lookups: Lookups, org: str, params: dict[str, Any], names: Sequence[tuple[str, CatalogKind]]
) -> dict[str, CatalogEntity]:
    """The entities ``params["<name>_id"]`` names, by name; unset ids are skipped.

    Raises:
        NotFoundError: every unknown id at once, by field path.
    """
    found, missing = await find_entities(lookups, org, params, names)
    if missing:
        raise NotFoundError.of("catalog entity", missing)
    return found


async def find_entities(
    lookups: Lookups, org: str, params: dict[str, Any], names: Sequence[tuple[str, CatalogKind]]
) -> tuple[dict[str, CatalogEntity], dict[str, str]]:
    """The entities found, by name, and the unknown ids, by field path (``params.<name>_id``).

    For callers that report unknown entities together with other unknown ids.
    """
    found: dict[str, CatalogEntity] = {}
    missing: dict[str, str] = {}
    for name, kind in names:
        entity_id = params[f"{name}_id"]
        if not entity_id:
            continue
        entity = await lookups.entity(org, kind, entity_id)
        if entity is None:
            missing[f"params.{name}_id"] = entity_id
        else:
            found[name] = entity
    return found, missing


def reference_set(entity: CatalogEntity, weight: float | None = None) -> dict[str, Any]:
    """An entity as compute reads it: its name, reference images and LoRA weight."""
    if weight is None:
        weight = entity.lora_default_weight
    return {
        "id": entity.id,
        "name": entity.name,
        "images": [f"artifact:{ref.sha256}" for ref in entity.reference_images],
        "lora_uri": entity.lora_uri,
        "weight": DEFAULT_LORA_WEIGHT if weight is None else weight,
    }
