"""Domain records to the contract's protobuf resources; translation only, no logic.

Stored parameters are mapped field by field onto their proto message: a stored key the
message does not have (written by a newer release, say) is skipped, never an error.
"""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from sartiq_grpc.sartiq.generation.v1 import enums_pb2
from sartiq_grpc.sartiq.generation.v1 import resources_pb2 as pb
from server.contract.enums import from_proto, to_proto
from server.domain import model
from server.domain.enums import (
    AttemptStatus,
    EditingTool,
    EventKind,
    GenerationStatus,
    GenerationType,
    PredictionStatus,
    StopReason,
    Strategy,
    TaskStatus,
    TaskType,
)
from server.domain.events import GenerationEvent

PARAMS_FIELD = {
    Strategy.GENERATE: "generate",
    Strategy.EDITING: "editing",
    Strategy.REFINE: "refine",
    Strategy.VIDEO: "video",
    Strategy.BACKGROUND_FIXING: "background_fixing",
    Strategy.IMAGE_ADJUSTING: "image_adjusting",
    Strategy.FACE_FIXING: "face_fixing",
}
# Stored enum values (plain names) inside parameters, by the proto enum they belong to.
_PARAM_ENUMS = {"EditingTool": EditingTool}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for ``value`` (naive means UTC, as the store keeps it), or None."""
    if value is None:
        return None
    if value.tzinfo is None:  # e.g. inside an event stored as JSON by an early release
        value = value.replace(tzinfo=UTC)
    micros = (value - _EPOCH) // _MICROSECOND  # exact integer arithmetic
    seconds, rest = divmod(micros, 1_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=rest * 1000)


# Recently converted parameter dicts, by identity. Records never change a dict once it is
# stored (see server.domain.recorder), so one conversion serves the create response, the
# creation event and every watcher.
_STRUCTS: OrderedDict[int, tuple[dict[str, Any], struct_pb2.Struct]] = OrderedDict()
_STRUCTS_KEPT = 4096


def struct(value: dict[str, Any] | None) -> struct_pb2.Struct | None:
    """A Struct holding a JSON-like dict; None (the field left unset) for an empty one.

    Events rely on this: a task change that did not touch the parameters carries none,
    and a client rebuilding by field presence keeps what it has (see GenerationEvent).
    An empty Struct would read as "the parameters are now empty".
    """
    if not value:
        return None
    cached = _STRUCTS.get(id(value))
    if cached is not None and cached[0] is value:
        return cached[1]
    result = struct_pb2.Struct()
    result.update(value)
    _STRUCTS[id(value)] = (value, result)
    if len(_STRUCTS) > _STRUCTS_KEPT:
        _STRUCTS.popitem(last=False)
    return result


def resource_error(error: model.ResourceError | None) -> pb.ResourceError | None:
    """The ResourceError message, or None."""
    if error is None:
        return None
    return pb.ResourceError(
        code=int(error.code),
        reason=error.reason,
        domain=model.ERROR_DOMAIN,
        message=error.message,
        metadata=error.metadata,
    )


def recipe(value: model.Recipe | None) -> pb.Recipe | None:
    """The Recipe message, or None."""
    if value is None:
        return None
    return pb.Recipe(
        task_type=to_proto(value.task_type, TaskType),
        parameters=struct(value.parameters),
        seed=value.seed,
        backend=value.backend,
        input_sha256=value.input_sha256,
        provider=struct(value.provider),
    )


def artifact(value: model.Artifact | None) -> pb.Artifact | None:
    """The Artifact message, or None.

    Its ``uri`` is the resource name made from the digest, whatever the record holds:
    events stored before 0008 recorded a server path there.
    """
    if value is None:
        return None
    result = pb.Artifact(
        sha256=value.sha256,
        mime_type=value.mime_type,
        size_bytes=value.size_bytes,
        width=value.width,
        height=value.height,
        uri=model.artifact_name(value.sha256),
        recipe=recipe(value.recipe),
        frame_count=value.frame_count,
        create_time=timestamp(value.created_at),
    )
    if value.duration_s is not None:
        result.duration.FromNanoseconds(round(value.duration_s * 1e9))
    return result


def task(value: model.ComputeTask) -> pb.ComputeTask:
    """The ComputeTask message."""
    return pb.ComputeTask(
        id=value.id,
        prediction_id=value.prediction_id,
        task_type=to_proto(value.task_type, TaskType),
        status=to_proto(value.status, TaskStatus),
        done=value.done,
        progress=value.progress,
        attempt=value.attempt,
        compute_task_id=value.compute_task_id,
        previous_compute_task_ids=value.previous_compute_task_ids,
        attempt_id=value.attempt_id,
        step=value.step,
        parameters=struct(value.params),
        error=resource_error(value.error),
        create_time=timestamp(value.created_at),
        start_time=timestamp(value.started_at),
        finish_time=timestamp(value.finished_at),
    )


def attempt(value: model.Attempt) -> pb.Attempt:
    """The Attempt message."""
    evaluation = value.evaluation
    return pb.Attempt(
        id=value.id,
        prediction_id=value.prediction_id,
        number=value.number,
        status=to_proto(value.status, AttemptStatus),
        done=value.done,
        task_ids=value.task_ids,
        seed=value.seed,
        adjustments=struct(value.adjustments),
        adjustment_reason=value.adjustment_reason,
        evaluation=None
        if evaluation is None
        else pb.Evaluation(
            score=evaluation.score,
            criteria=evaluation.criteria,
            feedback=evaluation.feedback,
            provider=evaluation.provider,
            measures=evaluation.measures,
        ),
        artifact=artifact(value.artifact),
        error=resource_error(value.error),
        create_time=timestamp(value.created_at),
        start_time=timestamp(value.started_at),
        finish_time=timestamp(value.finished_at),
    )


def _agentic_config(config: model.AgenticConfig) -> pb.AgenticConfig:
    expected = config.expectations
    return pb.AgenticConfig(
        max_attempts=config.max_attempts,
        min_confidence_score=config.min_confidence_score,
        evaluation_provider=config.evaluation_provider,
        expectations=None
        if expected == model.Expectations()
        else pb.EvaluationExpectations(
            framing=expected.framing,
            view_angle=expected.view_angle,
            gender=expected.gender,
            instructions=expected.instructions,
        ),
    )


def shot(value: model.OrchestratedShot | None) -> pb.OrchestratedShot | None:
    """The OrchestratedShot message, or None."""
    if value is None:
        return None
    return pb.OrchestratedShot(
        config=_agentic_config(value.config),
        attempt_count=value.attempt_count,
        best_attempt=value.best_attempt,
        stop_reason=(
            to_proto(value.stop_reason, StopReason)
            if value.stop_reason
            else enums_pb2.STOP_REASON_UNSPECIFIED
        ),
        attempts=[attempt(a) for a in value.attempts],
    )


def prediction(value: model.Prediction) -> pb.Prediction:
    """The Prediction message (with whatever tasks the record holds)."""
    return pb.Prediction(
        id=value.id,
        index=value.index,
        seed=value.seed,
        status=to_proto(value.status, PredictionStatus),
        done=value.done,
        artifact=artifact(value.artifact),
        score=value.score,
        tasks=[task(t) for t in value.tasks],
        agentic=shot(value.agentic),
        error=resource_error(value.error),
        create_time=timestamp(value.created_at),
        start_time=timestamp(value.started_at),
        finish_time=timestamp(value.finished_at),
    )


def counts(value: model.PredictionCounts) -> pb.PredictionCounts:
    """The PredictionCounts message."""
    return pb.PredictionCounts(
        pending_count=value.pending,
        generating_count=value.generating,
        evaluating_count=value.evaluating,
        completed_count=value.completed,
        error_count=value.error,
        cancelled_count=value.cancelled,
    )


def orchestration(value: model.Orchestration) -> pb.Orchestration:
    """The Orchestration message."""
    result = pb.Orchestration(type=to_proto(value.type, GenerationType))
    if value.agentic is not None:
        result.agentic.CopyFrom(_agentic_config(value.agentic))
    return result


# Recently encoded generations, by identity: the creation event and the create response
# encode the same snapshot, which nothing changes afterwards.
_GENERATIONS: OrderedDict[int, tuple[model.Generation, pb.Generation]] = OrderedDict()


def generation(value: model.Generation) -> pb.Generation:
    """The Generation message with whatever children the record holds."""
    cached = _GENERATIONS.get(id(value))
    if cached is not None and cached[0] is value:
        return cached[1]
    result = _generation(value)
    _GENERATIONS[id(value)] = (value, result)
    if len(_GENERATIONS) > 256:
        _GENERATIONS.popitem(last=False)
    return result


def _generation(value: model.Generation) -> pb.Generation:
    result = pb.Generation(
        id=value.id,
        organization=value.organization,
        type=to_proto(value.type, GenerationType),
        strategy=to_proto(value.strategy, Strategy),
        status=to_proto(value.status, GenerationStatus),
        done=value.done,
        request_id=value.request_id,
        labels=value.labels,
        orchestration=orchestration(value.orchestration),
        predictions=[prediction(p) for p in value.predictions],
        prediction_counts=counts(value.counts),
        error=resource_error(value.error),
        create_time=timestamp(value.created_at),
        start_time=timestamp(value.started_at),
        finish_time=timestamp(value.finished_at),
        deadline_time=timestamp(value.deadline_at),
        last_event_sequence=value.event_seq,
        queue_position=value.queue_position,
    )
    if value.params:
        fill(getattr(result, PARAMS_FIELD[value.strategy]), value.params)
    if value.refinement is not None:
        refine = value.refinement
        result.refinement.CopyFrom(
            pb.Refine(
                base_image_url=refine.base_image_url,
                base_image_sha256=refine.base_image_sha256,
                base_width=refine.base_width,
                base_height=refine.base_height,
                output_width=refine.output_width,
                output_height=refine.output_height,
                upscale_enabled=refine.upscale_enabled,
                upscale_factor=refine.upscale_factor,
                upscale_steps=refine.upscale_steps,
                upscale_denoise=refine.upscale_denoise,
                face_detail_enabled=refine.face_detail_enabled,
                face_detail_steps=refine.face_detail_steps,
            )
        )
    return result


def fill(message: Message, stored: dict[str, Any]) -> None:
    """Set every field of ``message`` that ``stored`` names; other keys are skipped.

    ``None`` leaves a field unset (an absent ``optional``); a Duration is stored as
    seconds; enums are stored by their name without the prefix.
    """
    for field in message.DESCRIPTOR.fields:
        value = stored.get(field.name)
        if value is None:
            continue
        if field.message_type is not None and field.message_type.full_name == (
            "google.protobuf.Duration"
        ):
            getattr(message, field.name).FromNanoseconds(round(float(value) * 1e9))
        elif field.type == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
            enum = _PARAM_ENUMS[field.enum_type.name]
            setattr(message, field.name, to_proto(value, enum))
        elif field.is_repeated:
            getattr(message, field.name).extend(value)
        else:
            setattr(message, field.name, value)


def event(value: GenerationEvent) -> pb.GenerationEvent:
    """The GenerationEvent message."""
    result = pb.GenerationEvent(
        generation_id=value.generation_id,
        sequence=value.sequence,
        event_time=timestamp(value.time),
        kind=to_proto(value.kind, EventKind),
        terminal=value.terminal,
        prediction_counts=counts(value.counts),
        note=value.note,
    )
    if value.generation is not None:
        result.generation.CopyFrom(generation(value.generation))
        # As Get would show it right after this change (a CHANGED event carries no
        # predictions to count).
        result.generation.prediction_counts.CopyFrom(result.prediction_counts)
        result.generation.last_event_sequence = value.sequence
    elif value.prediction is not None:
        result.prediction.CopyFrom(prediction(value.prediction))
    elif value.task is not None:
        result.task.CopyFrom(task(value.task))
    elif value.attempt is not None:
        result.attempt.CopyFrom(attempt(value.attempt))
    return result


_LEGACY_URI = b"file://"
_PROTOBUF_TYPES = "google.protobuf."


def _name_artifacts(message: Message) -> None:
    """Give every Artifact inside ``message`` its resource name as its URI."""
    if message.DESCRIPTOR is pb.Artifact.DESCRIPTOR:
        artifact_message: Any = message
        artifact_message.uri = model.artifact_name(artifact_message.sha256)
        return
    for field, value in message.ListFields():
        kind = field.message_type
        if kind is None or kind.full_name.startswith(_PROTOBUF_TYPES):
            continue  # scalars, and well-known types (Struct parameters) hold no Artifact
        if kind.GetOptions().map_entry:
            if kind.fields_by_name["value"].message_type is None:
                continue  # labels and other maps of scalars
            children = list(value.values())
        else:
            children = list(value) if field.is_repeated else [value]
        for child in children:
            _name_artifacts(child)


def decode_event(data: bytes) -> GenerationEvent:
    """A stored event: its columns' values, its counts and note, and the message itself.

    The resources stay encoded: watchers send the message as it is, except that an
    artifact stored with a server path as its URI (before 0008) gets its resource name.
    """
    message = pb.GenerationEvent.FromString(data)
    if _LEGACY_URI in data:
        _name_artifacts(message)
    task = message.task
    if message.HasField("task") and task.HasField("parameters") and not task.parameters.fields:
        # Logs stored by earlier releases say "unchanged" with an empty Struct; the
        # contract says it by leaving the field unset, so old logs are sent that way.
        task.ClearField("parameters")
    counts = message.prediction_counts
    return GenerationEvent(
        generation_id=message.generation_id,
        sequence=message.sequence,
        time=message.event_time.ToDatetime(tzinfo=UTC),
        kind=from_proto(message.kind, EventKind) or EventKind.GENERATION_CHANGED,
        terminal=message.terminal,
        counts=model.PredictionCounts(
            pending=counts.pending_count,
            generating=counts.generating_count,
            evaluating=counts.evaluating_count,
            completed=counts.completed_count,
            error=counts.error_count,
            cancelled=counts.cancelled_count,
        ),
        note=message.note,
        encoded=message,
    )
