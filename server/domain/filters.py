"""Which generations a list returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from server.domain.errors import FieldViolation


@dataclass(frozen=True, slots=True)
class GenerationFilter:
    """Criteria of ``ListGenerations``; empty collections mean "any"."""

    statuses: frozenset[str] = frozenset()
    strategies: frozenset[str] = frozenset()
    types: frozenset[str] = frozenset()
    labels: dict[str, str] = field(default_factory=dict)
    created_after: datetime | None = None
    created_before: datetime | None = None
    # What could not be decoded (an unknown enum value, a bad time): reported together
    # with the page size, the token and the labels, in one INVALID_ARGUMENT.
    problems: tuple[FieldViolation, ...] = ()
