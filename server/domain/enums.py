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
    DETAIL_ENHANCER = "DETAIL_ENHANCER"


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


class AttemptStatus(StrEnum):
    """Lifecycle of one AGENTIC attempt."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    EVALUATING = "EVALUATING"
    EVALUATED = "EVALUATED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class StopReason(StrEnum):
    """Why an AGENTIC shot stopped trying."""

    THRESHOLD_MET = "THRESHOLD_MET"
    ATTEMPTS_EXHAUSTED = "ATTEMPTS_EXHAUSTED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    # The next attempt would have repeated an earlier one; the best so far was accepted.
    NO_FURTHER_CHANGE = "NO_FURTHER_CHANGE"


class EventKind(StrEnum):
    """What a generation event describes, and so which resource it carries."""

    GENERATION_CREATED = "GENERATION_CREATED"
    GENERATION_CHANGED = "GENERATION_CHANGED"
    PREDICTION_CHANGED = "PREDICTION_CHANGED"
    TASK_CHANGED = "TASK_CHANGED"
    TASK_PROGRESS = "TASK_PROGRESS"
    ATTEMPT_CHANGED = "ATTEMPT_CHANGED"


class ComputeErrorCategory(StrEnum):
    """Why a compute call or task failed; the compute wire protocol's ``error_category``.

    VALIDATION and UNSUPPORTED are permanent; TRANSIENT and CAPACITY are worth a retry.
    """

    VALIDATION = "validation"
    UNSUPPORTED = "unsupported"
    TRANSIENT = "transient"
    CAPACITY = "capacity"
    INTERNAL = "internal"
    NOT_FOUND = "not_found"


class EditingTool(StrEnum):
    """The operation of an EDITING generation."""

    EDIT = "EDIT"
    SUBJECT_SWAP = "SUBJECT_SWAP"
    PRODUCT_ENHANCEMENT = "PRODUCT_ENHANCEMENT"


class CatalogKind(StrEnum):
    """The kinds of catalog entity GENERATE loads."""

    SUBJECT = "SUBJECT"
    PRODUCT = "PRODUCT"
    STYLE = "STYLE"
