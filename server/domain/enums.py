"""Enumerations of the domain, spelled with the platform's own words."""

from __future__ import annotations

from enum import StrEnum


class GenerationType(StrEnum):
    """How a generation is orchestrated."""

    BASE = "BASE"
    AGENTIC = "AGENTIC"


class Strategy(StrEnum):
    """What a generation does."""

    GENERATE = "GENERATE"
    EDITING = "EDITING"
    REFINE = "REFINE"
    VIDEO = "VIDEO"
    BACKGROUND_FIXING = "BACKGROUND_FIXING"
    IMAGE_ADJUSTING = "IMAGE_ADJUSTING"
    FACE_FIXING = "FACE_FIXING"


class TaskType(StrEnum):
    """The unit of work a compute backend runs."""

    GENERATION = "GENERATION"
    EDITING = "EDITING"
    REFINE = "REFINE"
    VIDEO_GENERATION = "VIDEO_GENERATION"
    BACKGROUND_FIX = "BACKGROUND_FIX"
    IMAGE_ADJUSTER = "IMAGE_ADJUSTER"
    FACE_ENHANCER = "FACE_ENHANCER"


class GenerationStatus(StrEnum):
    """Lifecycle of a generation."""

    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    PARTIALLY_COMPLETED = "PARTIALLY_COMPLETED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"


class PredictionStatus(StrEnum):
    """Lifecycle of one output slot."""

    PENDING = "PENDING"
    GENERATING = "GENERATING"
    EVALUATING = "EVALUATING"
    COMPLETED = "COMPLETED"
    ERROR = "ERROR"
    CANCELLED = "CANCELLED"


class TaskStatus(StrEnum):
    """Lifecycle of one compute task."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class StopReason(StrEnum):
    """Why an AGENTIC shot stopped trying."""

    THRESHOLD_MET = "THRESHOLD_MET"
    ATTEMPTS_EXHAUSTED = "ATTEMPTS_EXHAUSTED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"


class EventKind(StrEnum):
    """What a generation event describes."""

    GENERATION = "GENERATION"
    PREDICTION = "PREDICTION"
    TASK = "TASK"
    TASK_PROGRESS = "TASK_PROGRESS"
    ATTEMPT = "ATTEMPT"


class CatalogKind(StrEnum):
    """The kinds of catalog entity GENERATE loads."""

    SUBJECT = "SUBJECT"
    PRODUCT = "PRODUCT"
    STYLE = "STYLE"
