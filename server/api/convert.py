"""Conversion between protobuf messages and the domain; no logic beyond translation."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from sartiq_grpc.sartiq.generation.v1 import enums_pb2, resources_pb2, service_pb2
from server.domain.enums import (
    EventKind,
    GenerationStatus,
    GenerationType,
    PredictionStatus,
    Strategy,
    TaskStatus,
    TaskType,
)
from server.domain.errors import FieldViolation, InvalidArgumentError, Violations
from server.orchestration.watch import Heartbeat
from server.store.events import EventRecord
from server.store.models import Artifact, Generation, Prediction, Task
from server.store.repository import GenerationFilter
from server.store.uow import artifact_fields, error_dict, prediction_counts, task_error
from server.strategies.inputs import AgenticInput, CreateOptions, GenerateInput

E = TypeVar("E", bound=StrEnum)

_PREFIX: dict[type[StrEnum], tuple[str, Any]] = {
    GenerationType: ("GENERATION_TYPE_", enums_pb2.GenerationType),
    Strategy: ("STRATEGY_", enums_pb2.Strategy),
    GenerationStatus: ("GENERATION_STATUS_", enums_pb2.GenerationStatus),
    PredictionStatus: ("PREDICTION_STATUS_", enums_pb2.PredictionStatus),
    TaskStatus: ("TASK_STATUS_", enums_pb2.TaskStatus),
    TaskType: ("TASK_TYPE_", enums_pb2.TaskType),
    EventKind: ("EVENT_KIND_", enums_pb2.EventKind),
}

_PARAMS_FIELD = {Strategy.GENERATE: "generate"}
_PARAMS_MESSAGE: dict[Strategy, type[Message]] = {Strategy.GENERATE: resources_pb2.GenerateParams}


def enum_to_proto(value: StrEnum | str, kind: type[StrEnum]) -> Any:
    """The proto number of a domain enum value (typed Any: each enum has its own stub type)."""
    prefix, wrapper = _PREFIX[kind]
    return wrapper.Value(prefix + str(value))


def enum_from_proto(number: int, kind: type[E]) -> E | None:
    """The domain value of a proto enum number; None for UNSPECIFIED or unknown numbers."""
    prefix, wrapper = _PREFIX[kind]
    try:
        name = str(wrapper.Name(number))
    except ValueError:
        return None
    name = name.removeprefix(prefix)
    return kind(name) if name in kind.__members__ else None


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for ``value``, or None."""
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct:
    """A Struct holding a JSON-like dict."""
    result = struct_pb2.Struct()
    if value:
        result.update(value)
    return result


def create_options(request: Any) -> CreateOptions:
    """The options every create request shares."""
    orchestration = request.orchestration
    agentic = None
    if orchestration.HasField("agentic"):
        config = orchestration.agentic
        agentic = AgenticInput(
            max_attempts=config.max_attempts if config.HasField("max_attempts") else None,
            min_confidence_score=(
                config.min_confidence_score if config.HasField("min_confidence_score") else None
            ),
            evaluation_provider=config.evaluation_provider,
        )
    timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else None
    kind = enum_from_proto(orchestration.type, GenerationType)
    if kind is None and orchestration.type != enums_pb2.GENERATION_TYPE_UNSPECIFIED:
        # A value from a newer contract than this server knows.
        raise InvalidArgumentError(
            [FieldViolation("orchestration.type", f"unknown value {orchestration.type}")]
        )
    return CreateOptions(
        request_id=request.request_id,
        type=kind,
        agentic=agentic,
        labels=dict(request.labels),
        timeout_s=timeout,
        validate_only=request.validate_only,
    )


def _optional(message: Message, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def generate_input(params: resources_pb2.GenerateParams) -> GenerateInput:
    """The GENERATE parameters as the strategy reads them."""
    return GenerateInput(
        batch_size=params.batch_size,
        subject_id=params.subject_id,
        product_id=params.product_id,
        style_id=params.style_id,
        shot_type_string=params.shot_type_string,
        generated_prompt=params.generated_prompt,
        auto_generate_prompt=params.auto_generate_prompt,
        width=params.width,
        height=params.height,
        seed=_optional(params, "seed"),
        subject_lora_weight=_optional(params, "subject_lora_weight"),
        product_lora_weight=_optional(params, "product_lora_weight"),
        style_lora_weight=_optional(params, "style_lora_weight"),
        negative_prompt=params.negative_prompt,
        steps=params.steps,
    )


def generation_filter(message: service_pb2.GenerationFilter) -> GenerationFilter:
    """The list filter; unspecified or unknown enum values are named in violations.

    Raises:
        InvalidArgumentError: an enum value in the filter is not a known state.
    """
    v = Violations()

    def values(field: str, numbers: Any, kind: type[StrEnum]) -> frozenset[str]:
        out = set()
        for i, number in enumerate(numbers):
            value = enum_from_proto(number, kind)
            if value is None:
                v.add(f"filter.{field}[{i}]", "must be a specified, known value")
            else:
                out.add(value.value)
        return frozenset(out)

    result = GenerationFilter(
        statuses=values("statuses", message.statuses, GenerationStatus),
        strategies=values("strategies", message.strategies, Strategy),
        types=values("types", message.types, GenerationType),
        labels=dict(message.labels),
        created_after=(
            message.create_time_after.ToDatetime(tzinfo=UTC)
            if message.HasField("create_time_after")
            else None
        ),
        created_before=(
            message.create_time_before.ToDatetime(tzinfo=UTC)
            if message.HasField("create_time_before")
            else None
        ),
    )
    v.raise_if_any()
    return result


def error(reason: str | None, message: str | None) -> resources_pb2.Error | None:
    """An Error message, or None when there is no error."""
    return _payload_error(error_dict(reason, message))


def artifact(row: Artifact | None) -> resources_pb2.Artifact | None:
    """The Artifact resource."""
    if row is None:
        return None
    result = resources_pb2.Artifact(**artifact_fields(row))
    if row.duration_s is not None:
        result.duration.FromMilliseconds(int(row.duration_s * 1000))
    if row.recipe:
        result.recipe.CopyFrom(
            resources_pb2.Recipe(
                task_type=enum_to_proto(row.recipe["task_type"], TaskType),
                parameters=struct(row.recipe.get("parameters")),
                seed=int(row.recipe.get("seed", 0)),
                backend=str(row.recipe.get("backend", "")),
            )
        )
    return result


def task(row: Task) -> resources_pb2.Task:
    """The Task resource."""
    return resources_pb2.Task(
        id=row.id,
        prediction_id=row.prediction_id,
        task_type=enum_to_proto(row.task_type, TaskType),
        status=enum_to_proto(row.status, TaskStatus),
        progress=row.progress,
        attempt=row.attempt,
        previous_compute_task_ids=row.previous_compute_task_ids,
        compute_task_id=row.compute_task_id or "",
        parameters=struct(row.params),
        error=_payload_error(task_error(row)),
        create_time=timestamp(row.created_at),
        start_time=timestamp(row.started_at),
        finish_time=timestamp(row.finished_at),
    )


def prediction(row: Prediction, *, with_tasks: bool) -> resources_pb2.Prediction:
    """The Prediction resource, with its tasks when asked."""
    return resources_pb2.Prediction(
        id=row.id,
        index=row.index,
        seed=row.seed,
        status=enum_to_proto(row.status, PredictionStatus),
        artifact=artifact(row.artifact),
        score=row.score,
        tasks=[task(t) for t in row.tasks] if with_tasks else [],
        error=error(row.error_reason, row.error_message),
        create_time=timestamp(row.created_at),
        start_time=timestamp(row.started_at),
        finish_time=timestamp(row.finished_at),
    )


def generation(row: Generation, *, with_tasks: bool = True) -> resources_pb2.Generation:
    """The Generation resource."""
    strategy = Strategy(row.strategy)
    result = resources_pb2.Generation(
        id=row.id,
        organization=row.organization,
        type=enum_to_proto(row.type, GenerationType),
        strategy=enum_to_proto(strategy, Strategy),
        status=enum_to_proto(row.status, GenerationStatus),
        request_id=row.request_id or "",
        labels={label.key: label.value for label in row.labels},
        orchestration=json_format.ParseDict(
            _orchestration_json(row.orchestration), resources_pb2.Orchestration()
        ),
        predictions=[prediction(p, with_tasks=with_tasks) for p in row.predictions],
        prediction_counts=resources_pb2.PredictionCounts(**prediction_counts(row)),
        error=error(row.error_reason, row.error_message),
        create_time=timestamp(row.created_at),
        start_time=timestamp(row.started_at),
        finish_time=timestamp(row.finished_at),
        expire_time=timestamp(row.expire_at),
        last_event_sequence=row.event_seq,
    )
    params = {k: v for k, v in row.params.items() if v is not None}
    getattr(result, _PARAMS_FIELD[strategy]).CopyFrom(
        json_format.ParseDict(params, _PARAMS_MESSAGE[strategy]())
    )
    return result


def _orchestration_json(stored: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "GENERATION_TYPE_" + stored["type"]}
    if "agentic" in stored:
        out["agentic"] = {
            "max_attempts": stored["agentic"]["max_attempts"],
            "min_confidence_score": stored["agentic"]["min_confidence_score"],
            "evaluation_provider": stored["agentic"]["evaluation_provider"],
        }
    return out


def event(record: EventRecord) -> resources_pb2.GenerationEvent:
    """The GenerationEvent message of a stored event."""
    result = resources_pb2.GenerationEvent(
        generation_id=record.generation_id,
        sequence=record.sequence,
        time=timestamp(record.time),
        kind=enum_to_proto(record.kind, EventKind),
        terminal=record.terminal,
    )
    payload = record.payload
    err = _payload_error(payload.get("error"))
    if record.kind is EventKind.GENERATION:
        result.generation.CopyFrom(
            resources_pb2.GenerationChanged(
                status=enum_to_proto(payload["status"], GenerationStatus),
                error=err,
                prediction_counts=resources_pb2.PredictionCounts(**payload["counts"]),
            )
        )
    elif record.kind is EventKind.PREDICTION:
        result.prediction.CopyFrom(
            resources_pb2.PredictionChanged(
                prediction_id=payload["prediction_id"],
                index=payload["index"],
                status=enum_to_proto(payload["status"], PredictionStatus),
                artifact=_payload_artifact(payload.get("artifact")),
                error=err,
                score=payload.get("score"),
            )
        )
    elif record.kind in (EventKind.TASK, EventKind.TASK_PROGRESS):
        result.task.CopyFrom(
            resources_pb2.TaskChanged(
                task_id=payload["task_id"],
                prediction_id=payload["prediction_id"],
                status=enum_to_proto(payload["status"], TaskStatus),
                progress=payload["progress"],
                compute_task_id=payload["compute_task_id"],
                attempt=payload["attempt"],
                error=err,
                previous_compute_task_ids=payload.get("previous_compute_task_ids", []),
                note=payload.get("note", ""),
            )
        )
    return result


def _payload_error(value: dict[str, str] | None) -> resources_pb2.Error | None:
    return None if value is None else resources_pb2.Error(**value)


def _payload_artifact(value: dict[str, Any] | None) -> resources_pb2.Artifact | None:
    return None if value is None else resources_pb2.Artifact(**value)


def watch_item(item: EventRecord | Heartbeat) -> service_pb2.WatchGenerationResponse:
    """One message of a WatchGeneration stream."""
    if isinstance(item, Heartbeat):
        return service_pb2.WatchGenerationResponse(
            heartbeat=service_pb2.Heartbeat(time=timestamp(item.time))
        )
    return service_pb2.WatchGenerationResponse(event=event(item))
