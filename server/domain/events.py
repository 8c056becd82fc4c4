"""Generation events: typed records of every change, and their versioned stored form.

An event carries the changed resource as ``GetGeneration`` would show it (see the
``GenerationEvent`` message in the protos for what is left out and why). The stored
payload is JSON tagged with a format version; decoding ignores keys it does not know,
so logs written by a newer release still read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from server.domain.enums import EventKind, GenerationStatus, GenerationType, Strategy
from server.domain.model import (
    Attempt,
    ComputeTask,
    Generation,
    Prediction,
    PredictionCounts,
    from_json,
    to_json,
)

FORMAT_VERSION = 1


@dataclass(slots=True)
class GenerationEvent:
    """One entry of a generation's log.

    Exactly one of ``generation``, ``prediction``, ``task`` and ``attempt`` is set, as
    ``kind`` says.
    """

    generation_id: str
    sequence: int
    time: datetime
    kind: EventKind
    terminal: bool
    counts: PredictionCounts
    note: str = ""
    generation: Generation | None = None
    prediction: Prediction | None = None
    task: ComputeTask | None = None
    attempt: Attempt | None = None
    # What WatchGenerations filters and orders on; stored in columns, not the payload.
    organization: str = ""
    status: GenerationStatus | None = None
    strategy: Strategy | None = None
    type: GenerationType | None = None
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    cursor: int = 0
    # The event as the contract's message (made once, stored, and shared by every
    # watcher), and the API's stream message around it.
    encoded: Any = field(default=None, compare=False, repr=False)
    wire: Any = field(default=None, compare=False, repr=False)


_RESOURCES: tuple[tuple[str, type[Any]], ...] = (
    ("generation", Generation),
    ("prediction", Prediction),
    ("task", ComputeTask),
    ("attempt", Attempt),
)


def encode(event: GenerationEvent) -> dict[str, Any]:
    """The stored payload of ``event`` (its kind, sequence and time are columns)."""
    payload: dict[str, Any] = {
        "v": FORMAT_VERSION,
        "counts": to_json(event.counts),
        "note": event.note,
    }
    for name, _ in _RESOURCES:
        value = getattr(event, name)
        if value is not None:
            payload[name] = to_json(value)
    return payload


def decode(
    generation_id: str,
    sequence: int,
    time: datetime,
    kind: str,
    terminal: bool,
    payload: dict[str, Any],
) -> GenerationEvent:
    """The event a stored row holds."""
    event = GenerationEvent(
        generation_id=generation_id,
        sequence=sequence,
        time=time,
        kind=EventKind(kind),
        terminal=terminal,
        counts=from_json(PredictionCounts, payload.get("counts") or {}),
        note=str(payload.get("note") or ""),
    )
    for name, kind_type in _RESOURCES:
        value = payload.get(name)
        if value is not None:
            setattr(event, name, from_json(kind_type, value))
    return event
