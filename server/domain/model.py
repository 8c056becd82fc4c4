"""The domain's records as plain dataclasses: what services return and events carry.

Every layer speaks these types; the store maps its rows to them and the API maps them to
protobuf. They know nothing of either. Events store them as JSON through ``to_json`` /
``from_json``, which ignore keys they do not know, so a stored event written by a newer
release still reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from typing import Any, TypeVar

from pydantic import TypeAdapter

from server.domain.enums import (
    AttemptStatus,
    ComputeErrorCategory,
    GenerationStatus,
    GenerationType,
    PredictionStatus,
    StopReason,
    Strategy,
    TaskStatus,
    TaskType,
)
from server.domain.states import GENERATION_TERMINAL, PREDICTION_TERMINAL, TASK_TERMINAL

ERROR_DOMAIN = "generation.sartiq"


class Code(IntEnum):
    """The canonical status codes (``google.rpc.Code``), without importing gRPC."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# The code each compute error category implies (see ResourceError in the protos).
CATEGORY_CODES = {
    ComputeErrorCategory.VALIDATION: Code.INVALID_ARGUMENT,
    ComputeErrorCategory.UNSUPPORTED: Code.UNIMPLEMENTED,
    ComputeErrorCategory.TRANSIENT: Code.UNAVAILABLE,
    ComputeErrorCategory.CAPACITY: Code.RESOURCE_EXHAUSTED,
    ComputeErrorCategory.NOT_FOUND: Code.NOT_FOUND,
    ComputeErrorCategory.INTERNAL: Code.INTERNAL,
}
# The code each cause of an unavailable input implies (see INPUT_UNAVAILABLE in the protos).
INPUT_CAUSE_CODES = {
    "not_found": Code.NOT_FOUND,
    "forbidden": Code.PERMISSION_DENIED,
    "too_large": Code.INVALID_ARGUMENT,
    "too_many_redirects": Code.INVALID_ARGUMENT,
    "invalid_image": Code.INVALID_ARGUMENT,
    "timeout": Code.DEADLINE_EXCEEDED,
    "bad_status": Code.UNAVAILABLE,
    "unreachable": Code.UNAVAILABLE,
}


@dataclass(slots=True)
class ResourceError:
    """Why a resource failed or was cancelled: a code, a stable reason, a message, context."""

    code: Code
    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def cancelled(cls, message: str = "the generation was cancelled") -> ResourceError:
        """A cancellation by CancelGeneration."""
        return cls(Code.CANCELLED, "CANCELLED", message)

    @classmethod
    def deadline_exceeded(cls) -> ResourceError:
        """The generation's timeout passed."""
        return cls(Code.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", "the generation's deadline passed")

    @classmethod
    def compute_failed(cls, category: str, message: str, compute_task_id: str) -> ResourceError:
        """The compute server reported a failure of ``category`` (unknown ones: internal)."""
        try:
            known = ComputeErrorCategory(category)
        except ValueError:
            known = ComputeErrorCategory.INTERNAL
        metadata = {"category": known.value}
        if compute_task_id:
            metadata["compute_task_id"] = compute_task_id
        code = CATEGORY_CODES[known]
        return cls(code, "COMPUTE_FAILED", message, metadata)

    @classmethod
    def input_unavailable(cls, field: str, cause: str, message: str) -> ResourceError:
        """An image input fetched after create could not be used; ``cause`` says why."""
        code = INPUT_CAUSE_CODES.get(cause, Code.UNAVAILABLE)
        return cls(code, "INPUT_UNAVAILABLE", message, {"field": field, "cause": cause})

    @classmethod
    def evaluation_failed(cls, message: str) -> ResourceError:
        """An AGENTIC attempt's output could not be evaluated (or every attempt failed)."""
        return cls(Code.UNAVAILABLE, "EVALUATION_FAILED", message)

    @classmethod
    def internal(cls, correlation_id: str) -> ResourceError:
        """An unexpected failure; the detail is in the server log under ``correlation_id``."""
        return cls(
            Code.INTERNAL,
            "INTERNAL",
            f"the server failed unexpectedly; correlation id {correlation_id}",
            {"correlation_id": correlation_id},
        )


@dataclass(slots=True)
class Recipe:
    """How an artifact was produced."""

    task_type: TaskType
    parameters: dict[str, Any]
    seed: int
    backend: str
    input_sha256: list[str] = field(default_factory=list)
    # What the compute provider used beyond the parameters (model, scheduler, LoRAs...).
    provider: dict[str, Any] = field(default_factory=dict)


def artifact_name(sha256: str) -> str:
    """The resource name of the artifact with this digest: what clients see as its URI.

    A name, never a location: where the server keeps the bytes is its own business.
    """
    return f"artifacts/{sha256}"


@dataclass(slots=True)
class Artifact:
    """A content-addressed image or video.

    ``uri`` is its resource name (``artifact_name``); ``created_at`` is when the
    organization looking at it first held it, not when anyone first stored the bytes.
    """

    sha256: str
    mime_type: str
    size_bytes: int
    width: int
    height: int
    uri: str
    created_at: datetime
    duration_s: float | None = None
    frame_count: int = 0
    recipe: Recipe | None = None


@dataclass(slots=True)
class ComputeTask:
    """One unit of work sent to compute."""

    id: str
    prediction_id: str
    task_type: TaskType
    status: TaskStatus
    params: dict[str, Any]
    created_at: datetime
    progress: float = 0.0
    attempt: int = 1
    compute_task_id: str = ""
    previous_compute_task_ids: list[str] = field(default_factory=list)
    attempt_id: str = ""
    attempt_number: int = 1
    step: int = 0
    error: ResourceError | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def done(self) -> bool:
        """True once the status is terminal."""
        return self.status in TASK_TERMINAL


@dataclass(slots=True)
class Evaluation:
    """An AGENTIC attempt's quality score, per criterion and overall."""

    score: float
    criteria: dict[str, float]
    feedback: str
    provider: str
    measures: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Attempt:
    """One AGENTIC try of a prediction."""

    id: str
    prediction_id: str
    number: int
    status: AttemptStatus
    seed: int
    created_at: datetime
    task_ids: list[str] = field(default_factory=list)
    adjustments: dict[str, Any] = field(default_factory=dict)
    adjustment_reason: str = ""
    evaluation: Evaluation | None = None
    artifact: Artifact | None = None
    error: ResourceError | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def done(self) -> bool:
        """True once the status is terminal."""
        return self.status in (
            AttemptStatus.EVALUATED,
            AttemptStatus.FAILED,
            AttemptStatus.CANCELLED,
        )


@dataclass(frozen=True, slots=True)
class Expectations:
    """What an AGENTIC evaluator should expect of a result (free text, all optional)."""

    framing: str = ""
    view_angle: str = ""
    gender: str = ""
    instructions: str = ""


@dataclass(slots=True)
class AgenticConfig:
    """The effective AGENTIC settings."""

    max_attempts: int
    min_confidence_score: float
    evaluation_provider: str
    expectations: Expectations = field(default_factory=Expectations)


@dataclass(frozen=True, slots=True)
class PlannedStep:
    """One task of a prediction's chain as the strategy planned it, before any resolution.

    An AGENTIC retry starts from these (a ``step:<n>`` input names step n's output).
    """

    task_type: TaskType
    params: dict[str, Any]


@dataclass(slots=True)
class OrchestratedShot:
    """AGENTIC bookkeeping of one prediction.

    ``plan`` is the chain every attempt starts from; it is stored, not shown by the API
    (attempt 1's tasks show it).
    """

    config: AgenticConfig
    attempt_count: int = 0
    best_attempt: int = 0
    stop_reason: StopReason | None = None
    attempts: list[Attempt] = field(default_factory=list)
    plan: list[PlannedStep] = field(default_factory=list)

    def attempt(self, number: int) -> Attempt:
        """The attempt with ``number`` (1-based)."""
        return self.attempts[number - 1]


@dataclass(frozen=True, slots=True)
class Orchestration:
    """The validated orchestration choice, defaults filled."""

    type: GenerationType
    agentic: AgenticConfig | None = None


@dataclass(slots=True)
class Prediction:
    """One output slot of a generation."""

    id: str
    index: int
    seed: int
    status: PredictionStatus
    created_at: datetime
    artifact: Artifact | None = None
    score: float | None = None
    tasks: list[ComputeTask] = field(default_factory=list)
    agentic: OrchestratedShot | None = None
    error: ResourceError | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None

    @property
    def done(self) -> bool:
        """True once the status is terminal."""
        return self.status in PREDICTION_TERMINAL


@dataclass(frozen=True, slots=True)
class PredictionCounts:
    """How many of a generation's predictions are in each status."""

    pending: int = 0
    generating: int = 0
    evaluating: int = 0
    completed: int = 0
    error: int = 0
    cancelled: int = 0

    @classmethod
    def of(cls, predictions: list[Prediction]) -> PredictionCounts:
        """Count ``predictions`` by status."""
        counts = [0] * len(_COUNT_SLOTS)
        for prediction in predictions:
            counts[_COUNT_SLOTS[prediction.status]] += 1
        return cls(*counts)


# Position of each status among PredictionCounts' fields (declared in the same order).
_COUNT_SLOTS = {status: index for index, status in enumerate(PredictionStatus)}


@dataclass(frozen=True, slots=True)
class Refine:
    """REFINE's record: its input as resolved at create and its effective settings."""

    base_image_url: str
    upscale_enabled: bool
    upscale_factor: float
    upscale_steps: int
    upscale_denoise: float
    face_detail_enabled: bool
    face_detail_steps: int
    base_image_sha256: str = ""
    base_width: int = 0
    base_height: int = 0
    output_width: int = 0
    output_height: int = 0


@dataclass(slots=True)
class Generation:
    """One request for imagery and everything that happened to it."""

    id: str
    organization: str
    type: GenerationType
    strategy: Strategy
    status: GenerationStatus
    params: dict[str, Any]
    orchestration: Orchestration
    created_at: datetime
    request_id: str = ""
    fingerprint: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    predictions: list[Prediction] = field(default_factory=list)
    error: ResourceError | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline_at: datetime | None = None
    event_seq: int = 0
    refinement: Refine | None = None
    # Computed when read (not stored): its place among generations waiting to start.
    queue_position: int = 0

    @property
    def done(self) -> bool:
        """True once the status is terminal."""
        return self.status in GENERATION_TERMINAL

    @property
    def counts(self) -> PredictionCounts:
        """Its predictions counted by status."""
        return PredictionCounts.of(self.predictions)


@dataclass(slots=True)
class ReferenceImage:
    """A catalog entity's reference image."""

    sha256: str
    mime_type: str
    width: int
    height: int
    uri: str


@dataclass(slots=True)
class CatalogEntity:
    """A subject, product or style."""

    id: str
    organization: str
    kind: str
    name: str
    description: str
    created_at: datetime
    reference_images: list[ReferenceImage] = field(default_factory=list)
    lora_uri: str = ""
    lora_default_weight: float | None = None


T = TypeVar("T")
_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def _adapter(kind: type[T]) -> TypeAdapter[T]:
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter


def to_json(value: Any) -> dict[str, Any]:
    """A JSON-ready dict of a domain dataclass."""
    result: dict[str, Any] = _adapter(type(value)).dump_python(value, mode="json")
    return result


def from_json(kind: type[T], data: dict[str, Any]) -> T:
    """The domain dataclass ``kind`` from ``to_json`` output; unknown keys are ignored."""
    return _adapter(kind).validate_python(data)


_FIELD_NAMES: dict[type[Any], tuple[str, ...]] = {}


def _field_names(kind: type[Any]) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(kind)
    if names is None:
        names = _FIELD_NAMES[kind] = tuple(f.name for f in dataclasses.fields(kind))
    return names


def clone(record: T, **changes: Any) -> T:
    """A shallow copy of a record with ``changes``: ``dataclasses.replace``, but cheaper.

    Safe as a snapshot because records are treated as immutable below their top level
    (see ``server.domain.recorder``).
    """
    kind: type[Any] = type(record)
    copy: T = object.__new__(kind)
    for name in _field_names(kind):
        object.__setattr__(copy, name, changes[name] if name in changes else getattr(record, name))
    return copy


def without_children(generation: Generation) -> Generation:
    """The generation's own fields, without predictions or creation-time inputs."""
    return dataclasses.replace(
        generation, predictions=[], params={}, labels={}, fingerprint="", refinement=None
    )


def prediction_alone(prediction: Prediction) -> Prediction:
    """The prediction's own fields, without its tasks and attempts."""
    agentic = prediction.agentic
    if agentic is not None:
        agentic = clone(agentic, attempts=[])
    return clone(prediction, tasks=[], agentic=agentic)


def task_change(task: ComputeTask, *, with_params: bool) -> ComputeTask:
    """The task as an event carries it: its parameters only when it is new."""
    return clone(task) if with_params else clone(task, params={})
