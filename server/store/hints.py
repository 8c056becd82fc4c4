"""The wake-up a replica sends other replicas when it commits events (PostgreSQL NOTIFY).

A hint is only a hint: it says which organizations (and, when few, which generations up
to which sequence) have new events, never the events themselves; a watcher woken by it
reads what it has not seen from the table. Its payload is bounded well under
PostgreSQL's 8,000 bytes: past ``MAX_HINT_BYTES`` it names organizations only, and past
that it names nothing, which wakes every watcher of the replicas that receive it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger(__name__)

CHANNEL = "sartiq_events"
MAX_HINT_BYTES = 4000

# An organization's generations: generation id -> the last sequence committed; None: any.
Generations = dict[str, int] | None


class Hint(BaseModel):
    """What a commit of another replica changed; ``organizations`` None means anything."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    origin: str = Field(max_length=256)
    organizations: dict[str, dict[str, int] | None] | None = None


def encode(origin: str, events: Iterable[Mapping[str, Any]]) -> str:
    """The payload naming the organizations and generations of ``events`` (rows)."""
    organizations: dict[str, dict[str, int] | None] = {}
    for row in events:
        generations = organizations.setdefault(row["organization"], {})
        if generations is not None:
            sequence = row["sequence"]
            if generations.get(row["generation_id"], 0) < sequence:
                generations[row["generation_id"]] = sequence
    payload = Hint(origin=origin, organizations=organizations).model_dump_json()
    if len(payload.encode()) <= MAX_HINT_BYTES:
        return payload
    coarse: dict[str, dict[str, int] | None] = dict.fromkeys(organizations)
    payload = Hint(origin=origin, organizations=coarse).model_dump_json()
    if len(payload.encode()) <= MAX_HINT_BYTES:
        return payload
    return Hint(origin=origin).model_dump_json()


def decode(payload: str) -> Hint | None:
    """The hint in ``payload``, or None when it is not one (it then wakes everything)."""
    try:
        return Hint.model_validate_json(payload)
    except ValidationError:
        log.warning("a notification on %s is not a hint (%d bytes)", CHANNEL, len(payload))
        return None
