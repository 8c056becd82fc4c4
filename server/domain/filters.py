"""Which generations a list returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True, slots=True)
class GenerationFilter:
    """Criteria of ``ListGenerations``; empty collections mean "any"."""

    statuses: frozenset[str] = frozenset()
    strategies: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    labels: dict[str, str] = field(default_factory=dict)
    created_after: datetime | None = None
    created_before: datetime | None = None
