"""The compute wire protocol (DESIGN §6): one schema, used by the compute server and its clients.

Every body that crosses the wire is one of the pydantic models below. The compute server
builds its answers through them and validates what it is sent; the HTTP adapter and the
remote evaluator parse every answer through them (``parse``). An answer that does not
validate (JSON ``null``, a number, a list, an object without a required field, a status
nobody knows, a truncated or bit-flipped body, the wrong content type) is a
``WireFormatError``, which the clients map onto a retryable error category: it never
escapes as an exception of its own.

* ``POST /api/v1/tasks/``: ``SubmitRequest`` (the key also as the ``Idempotency-Key``
  header) -> ``TaskAnswer`` (201). The same key always answers the same task.
* ``GET /api/v1/tasks/?idempotency_key=K``: ``TaskList``, the task that key created (none
  or one). A client whose submit answer was lost or unreadable finds and releases the
  task it may have created here.
* ``GET /api/v1/tasks/{id}``: ``TaskAnswer``; 404 for an unknown id. A completed task
  names each output (``OutputItem``) with its ``url``, ``sha256`` and ``size``.
* ``GET /api/v1/tasks/{id}/events``: the task pushed as it changes, a
  ``text/event-stream`` of server-sent events: one ``event: task`` per change, its
  ``id: n`` counting up from 1, its ``data:`` the ``TaskAnswer`` as one line of JSON. The
  first event is the task now; the stream ends after the terminal state. While nothing
  changes, a ``: keep-alive`` comment comes at least every ``EVENTS_KEEPALIVE_S`` seconds,
  so proxies and the client's read timeout see the stream alive. 404 (an ``ErrorBody``,
  before any event) for an unknown id. Polling the task is the fallback: a client whose
  stream fails, is cut or carries an event it cannot read (or a server without the route:
  404, 405, 501) polls the task instead.
* ``GET /api/v1/tasks/{id}/outputs/{n}``: the bytes of output n. The client checks the
  size and the SHA-256 while it downloads, then decodes the bytes: the mime type,
  dimensions, frame count and duration are the bytes' own, never the JSON's.
* ``POST /api/v1/tasks/{id}/cancel``: idempotent; answers the ``TaskAnswer``.
* ``POST /api/v1/evaluation/``: ``EvaluationRequest`` -> ``EvaluationAnswer``.
* ``GET /health``: ``HealthAnswer``: capacity, how many tasks were ever created and have
  ended (created - ended = running + waiting: the tasks still live), and how many event
  streams are open.

Input images travel inside the parameters as ``data:`` URIs (base64); every error answer
is an ``ErrorBody``. Calls need ``authorization: Bearer <token>`` when the server has one,
``/health`` excepted. JSON answers carry ``content-type: application/json``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from server.domain.enums import TaskStatus

TASKS_PATH = "/api/v1/tasks/"
EVALUATION_PATH = "/api/v1/evaluation/"
HEALTH_PATH = "/health"
JSON_TYPE = "application/json"
EVENTS_TYPE = "text/event-stream"
TASK_EVENT = "task"  # the name of a task event in the events stream
EVENTS_KEEPALIVE_S = 2.0  # the longest the events stream stays silent
STATUSES = {status.value.lower(): status for status in TaskStatus}
_DATA_URI = re.compile(r"data:([\w.+/-]+);base64,", re.ASCII)
_MAGIC = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"RIFF", "image/webp"),
)

M = TypeVar("M", bound=BaseModel)
WireStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Key = Annotated[str, StringConstraints(min_length=1, max_length=200)]
Text = Annotated[str, StringConstraints(max_length=4000)]
Word = Annotated[str, StringConstraints(max_length=64)]
# What a provider says produced an output: scalars, and lists of small records (LoRAs).
RecipeScalar = Annotated[str, StringConstraints(max_length=2048)] | int | float | bool | None
RecipeValue = RecipeScalar | Annotated[list[dict[Word, RecipeScalar]], Field(max_length=16)]


class WireFormatError(ValueError):
    """A body does not match the protocol's schema; the message names the first fields."""


class _Wire(BaseModel):
    # Strict: "5" is not 5. Unknown fields are ignored, so either side may add fields.
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True, allow_inf_nan=False)


class SubmitRequest(_Wire):
    """Create a task (or find the one ``idempotency_key`` created)."""

    task_type: Word
    parameters: dict[str, Any]
    idempotency_key: Key
    origin_organization: Annotated[str, StringConstraints(max_length=200)] = ""


class OutputItem(_Wire):
    """One output of a completed task: where to fetch it and what its bytes must be."""

    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    sha256: Sha256
    size: int = Field(ge=1)
    seed: int = 0
    # The server's own probe of the bytes; a client probes them again and uses its own.
    mime_type: Word = ""
    width: int = Field(default=0, ge=0)
    height: int = Field(default=0, ge=0)
    duration_s: float | None = Field(default=None, ge=0)
    frame_count: int = Field(default=0, ge=0)
    notes: list[Text] = Field(default_factory=list, max_length=32)
    recipe: dict[Word, RecipeValue] = Field(default_factory=dict, max_length=32)


class TaskOutput(_Wire):
    """A task's outputs, images and videos."""

    images: list[OutputItem] = Field(default_factory=list, max_length=64)
    videos: list[OutputItem] = Field(default_factory=list, max_length=64)

    @property
    def items(self) -> list[OutputItem]:
        """Every output, images first, in the order the indexes of their URLs follow."""
        return [*self.images, *self.videos]


class TaskAnswer(_Wire):
    """A task as the compute server reports it (submit, status and cancel answers)."""

    # Only characters safe in a URL path segment: the id becomes part of the next paths.
    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,256}$")]
    idempotency_key: Key
    task_type: Word
    status: WireStatus
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    output: TaskOutput = Field(default_factory=TaskOutput)
    error_message: Text | None = None
    error_category: Word | None = None

    @model_validator(mode="after")
    def _completed_has_outputs(self) -> TaskAnswer:
        if self.status == "completed" and not self.output.items:
            raise ValueError("a completed task names at least one output")
        return self

    @property
    def task_status(self) -> TaskStatus:
        """The status as this service's enum."""
        return STATUSES[self.status]


class TaskList(_Wire):
    """The answer to a lookup by idempotency key: the task it created, if any."""

    tasks: list[TaskAnswer] = Field(max_length=16)


class ErrorBody(_Wire):
    """Every error answer (4xx, 5xx)."""

    error_category: Word = ""
    error_message: Text = ""


class Capacity(_Wire):
    """How busy the compute server is."""

    workers: int = Field(ge=0)
    running: int = Field(ge=0)
    waiting: int = Field(ge=0)


class HealthAnswer(_Wire):
    """Liveness, capacity and the task counters of ``GET /health``."""

    status: Literal["ok"]
    capacity: Capacity
    tasks_created: int = Field(ge=0)
    tasks_ended: int = Field(ge=0)
    event_streams: int = Field(default=0, ge=0)  # events streams open now
    # What serves each task type: {"provider": "cpu"}, or "diffusion" with its "model"
    # (the registry's name) and "pipeline" (the diffusers class).
    providers: dict[Word, dict[Word, Text]] = Field(default_factory=dict, max_length=32)

    @property
    def live(self) -> int:
        """Tasks created and not ended: pending or running."""
        return self.capacity.running + self.capacity.waiting


class Expectations(_Wire):
    """What the request says the image should show (free text)."""

    framing: Text = ""
    view_angle: Text = ""
    gender: Text = ""
    instructions: Text = ""


class EvaluationRequest(_Wire):
    """Score one image (``data:`` URIs) against what was asked."""

    image: Annotated[str, StringConstraints(min_length=1)]
    base: str | None = None
    strategy: Word = "GENERATE"
    expected_size: tuple[Annotated[int, Field(ge=1)], Annotated[int, Field(ge=1)]] | None = None
    edited_region: Literal["all", "faces", "none"] = "all"
    expects_face: bool = False
    expectations: Expectations = Field(default_factory=Expectations)


class EvaluationAnswer(_Wire):
    """An evaluation: overall score, per-criterion scores (0-1), feedback, raw measures."""

    score: float = Field(ge=0.0, le=1.0)
    criteria: dict[Word, Annotated[float, Field(ge=0.0, le=1.0)]]
    feedback: Text = ""
    measures: dict[Word, float] = Field(default_factory=dict)


def parse(model: type[M], content: bytes) -> M:
    """``content`` (a JSON body) as ``model``.

    Raises:
        WireFormatError: not JSON, or not what ``model`` requires.
    """
    try:
        return model.model_validate_json(content)
    except ValidationError as exc:
        raise WireFormatError(f"not a valid {model.__name__}: {describe(exc)}") from None


def describe(exc: ValidationError, limit: int = 3) -> str:
    """The first ``limit`` problems as ``field: message`` (never the offending values)."""
    problems = [
        f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
        for error in exc.errors(include_url=False, include_input=False)[:limit]
    ]
    more = exc.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")


def task_path(compute_id: str) -> str:
    """The path of a task."""
    return f"{TASKS_PATH}{compute_id}"


def events_path(compute_id: str) -> str:
    """The path of a task's events stream."""
    return f"{TASKS_PATH}{compute_id}/events"


def output_path(compute_id: str, index: int) -> str:
    """The path an output's bytes are fetched from (the only URL a client follows)."""
    return f"{TASKS_PATH}{compute_id}/outputs/{index}"


def sniff(data: bytes) -> str:
    """The mime type of encoded media by its first bytes (octet-stream when unknown)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[4:8] == b"ftyp":
        return "video/mp4"
    return "application/octet-stream"


def data_uri(data: bytes) -> str:
    """``data:<mime>;base64,...`` of ``data``."""
    return f"data:{sniff(data)};base64,{base64.b64encode(data).decode('ascii')}"


def is_data_uri(value: str) -> bool:
    """Whether ``value`` is a base64 ``data:`` URI."""
    return _DATA_URI.match(value) is not None


def decode_data_uri(value: str, max_bytes: int) -> bytes:
    """The bytes of a base64 ``data:`` URI.

    Raises:
        ValueError: not a base64 data URI, bad base64, or more than ``max_bytes``.
    """
    match = _DATA_URI.match(value)
    if match is None:
        raise ValueError("not a base64 data: URI")
    payload = value[match.end() :]
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise ValueError(f"data: URI holds more than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64 in data: URI: {exc}") from None


def map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """A copy of a JSON value with every string passed through ``change``."""
    if isinstance(value, dict):
        return {k: map_strings(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [map_strings(v, change) for v in value]
    if isinstance(value, str):
        return change(value)
    return value
