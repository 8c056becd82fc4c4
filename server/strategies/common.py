"""Validation shared by every strategy: the create options and the bounds of common fields."""

from __future__ import annotations

import re
from collections.abc import Collection

from server.domain.enums import GenerationType
from server.domain.errors import Violations, key_path
from server.domain.model import AgenticConfig, Expectations, Orchestration
from server.strategies.inputs import CreateOptions

MAX_SEED = 2**31 - 1
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
LABEL_KEY_RE = re.compile(r"[a-z][a-z0-9_-]{0,62}")
MAX_LABELS = 32
MAX_LABEL_VALUE = 255
MIN_TIMEOUT_S = 1.0
MAX_TIMEOUT_S = 24 * 3600.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MIN_CONFIDENCE = 0.7
DEFAULT_PROVIDER = "auto"


def check_range(
    v: Violations, field: str, value: float, low: float, high: float, *, unit: str = ""
) -> None:
    """Record a violation unless ``low <= value <= high``."""
    if not low <= value <= high:
        v.add(field, f"must be between {low:g} and {high:g}{unit}, got {value:g}")


def check_length(v: Violations, field: str, value: str, high: int, *, low: int = 0) -> None:
    """Record a violation unless the string length lies within bounds."""
    if len(value) > high:
        v.add(field, f"must be at most {high} characters, got {len(value)}")
    elif len(value) < low:
        v.add(field, "is required" if low == 1 else f"must be at least {low} characters")


def check_dimension(v: Violations, field: str, value: int) -> None:
    """Image sides: 64–4096 pixels and a multiple of 8."""
    if not 64 <= value <= 4096:
        v.add(field, f"must be between 64 and 4096 pixels, got {value}")
    elif value % 8:
        v.add(field, f"must be a multiple of 8, got {value}")


def check_seed(v: Violations, field: str, value: int | None) -> None:
    """Seeds: 0 to 2^31-1 when given."""
    if value is not None and not 0 <= value <= MAX_SEED:
        v.add(field, f"must be between 0 and {MAX_SEED}, got {value}")


def check_labels(v: Violations, labels: dict[str, str], field: str = "labels") -> None:
    """Labels: at most 32, keys 1-63 of [a-z0-9_-] from a letter, values up to 255."""
    if len(labels) > MAX_LABELS:
        v.add(field, f"must have at most {MAX_LABELS} entries, got {len(labels)}")
        return  # naming each entry of an oversized map would only flood the answer
    for key, value in sorted(labels.items()):
        if not LABEL_KEY_RE.fullmatch(key):
            v.add(key_path(field, key), "key must be 1-63 of [a-z0-9_-] starting with a letter")
        if len(value) > MAX_LABEL_VALUE:
            v.add(key_path(field, key), f"value must be at most {MAX_LABEL_VALUE} characters")


def validate_options(
    options: CreateOptions, v: Violations, providers: Collection[str]
) -> Orchestration:
    """Check the create options and return the orchestration with its defaults filled.

    ``providers`` are the evaluation providers this server offers ("auto" included).
    """
    if options.request_id and not REQUEST_ID_RE.fullmatch(options.request_id):
        v.add("request_id", "must be 1-128 characters of [A-Za-z0-9._:-]")
    v.extend(options.problems)
    check_labels(v, options.labels)
    if options.timeout_s is not None:
        check_range(v, "timeout", options.timeout_s, MIN_TIMEOUT_S, MAX_TIMEOUT_S, unit=" s")
    kind = options.type or GenerationType.BASE
    agentic = options.agentic
    if agentic is not None and kind is GenerationType.BASE:
        v.add("orchestration.agentic", "is only allowed when orchestration.type is AGENTIC")
    max_attempts = DEFAULT_MAX_ATTEMPTS
    min_score = DEFAULT_MIN_CONFIDENCE
    provider = DEFAULT_PROVIDER
    expectations = Expectations()
    if agentic is not None:
        expectations = Expectations(
            agentic.framing, agentic.view_angle, agentic.gender, agentic.instructions
        )
        for name in ("framing", "view_angle", "gender"):
            check_length(
                v, f"orchestration.agentic.expectations.{name}", getattr(agentic, name), 200
            )
        check_length(
            v, "orchestration.agentic.expectations.instructions", agentic.instructions, 2000
        )
        if agentic.max_attempts is not None:
            max_attempts = agentic.max_attempts
            check_range(v, "orchestration.agentic.max_attempts", max_attempts, 1, 10)
        if agentic.min_confidence_score is not None:
            min_score = agentic.min_confidence_score
            check_range(v, "orchestration.agentic.min_confidence_score", min_score, 0, 1)
        provider = agentic.evaluation_provider or DEFAULT_PROVIDER
        if provider not in providers:
            known = ", ".join(providers)
            v.add("orchestration.agentic.evaluation_provider", f"must be one of: {known}")
    if kind is GenerationType.BASE:
        return Orchestration(kind)
    return Orchestration(kind, AgenticConfig(max_attempts, min_score, provider, expectations))
