"""Request messages to plain domain inputs, range-checked before any conversion.

A value that cannot be converted (an unknown enum number, a Duration or Timestamp out of
range) is recorded as a field violation next to the others, never raised on its own.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message

from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2, resources_pb2
from server.contract.enums import from_proto
from server.domain.enums import EditingTool, GenerationStatus, GenerationType, Strategy
from server.domain.errors import Violations
from server.domain.filters import GenerationFilter
from server.strategies.common import check_labels
from server.strategies.inputs import (
    AgenticInput,
    BackgroundFixingInput,
    CreateOptions,
    EditingInput,
    FaceFixingInput,
    GenerateInput,
    ImageAdjustingInput,
    RefineInput,
    VideoInput,
)

MAX_FILTER_VALUES = 16
# What a Timestamp may hold (0001-01-01 to 9999-12-31, as the protobuf spec says).
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799
_MAX_DURATION_SECONDS = 315_576_000_000


def duration_seconds(value: duration_pb2.Duration, field: str, v: Violations) -> float | None:
    """The Duration in seconds, or None (and a violation) when it is malformed."""
    seconds, nanos = value.seconds, value.nanos
    well_formed = (
        abs(seconds) <= _MAX_DURATION_SECONDS
        and abs(nanos) <= 999_999_999
        and (seconds == 0 or nanos == 0 or (seconds > 0) == (nanos > 0))
    )
    if not well_formed:
        v.add(field, "is not a valid Duration (seconds and nanos out of range or of mixed sign)")
        return None
    return seconds + nanos / 1e9


def timestamp_value(value: timestamp_pb2.Timestamp, field: str, v: Violations) -> datetime | None:
    """The Timestamp as an aware datetime, or None (and a violation) when out of range."""
    if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos <= 999_999_999):
        v.add(field, "is not a valid Timestamp (years 1 to 9999)")
        return None
    base = datetime(1970, 1, 1, tzinfo=UTC)
    return base + timedelta(seconds=value.seconds, microseconds=value.nanos // 1000)


def _optional(message: Message, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def create_options(request: Any) -> CreateOptions:
    """The options every create request shares; decoding problems ride along as violations."""
    v = Violations()
    orchestration = request.orchestration
    agentic = None
    if orchestration.HasField("agentic"):
        config = orchestration.agentic
        agentic = AgenticInput(
            max_attempts=_optional(config, "max_attempts"),
            min_confidence_score=_optional(config, "min_confidence_score"),
            evaluation_provider=config.evaluation_provider,
            framing=config.expectations.framing,
            view_angle=config.expectations.view_angle,
            gender=config.expectations.gender,
            instructions=config.expectations.instructions,
        )
    timeout = None
    if request.HasField("timeout"):
        timeout = duration_seconds(request.timeout, "timeout", v)
    kind = from_proto(orchestration.type, GenerationType)
    if kind is None and orchestration.type != enums_pb2.GENERATION_TYPE_UNSPECIFIED:
        v.add("orchestration.type", f"unknown value {orchestration.type}")
    return CreateOptions(
        request_id=request.request_id,
        type=kind,
        agentic=agentic,
        labels=dict(request.labels),
        timeout_s=timeout,
        validate_only=request.validate_only,
        problems=tuple(v.items),
    )


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


def editing_input(params: resources_pb2.EditingParams) -> EditingInput:
    """The EDITING parameters as the strategy reads them (an unknown tool is unset)."""
    return EditingInput(
        base_img_path=params.base_img_path,
        reference_images=tuple(params.reference_images),
        subject_id=params.subject_id,
        product_id=params.product_id,
        tool=from_proto(params.tool, EditingTool),
        width=params.width,
        height=params.height,
        detail_enhancer=params.detail_enhancer,
        seed=_optional(params, "seed"),
        prompt=params.prompt,
    )


def refine_input(params: resources_pb2.RefineParams) -> RefineInput:
    """The REFINE parameters as the strategy reads them."""
    return RefineInput(
        base_image_url=params.base_image_url,
        batch_size=params.batch_size,
        target_width=params.target_width,
        target_height=params.target_height,
        upscale_enabled=params.upscale_enabled,
        upscale_factor=params.upscale_factor,
        upscale_steps=params.upscale_steps,
        upscale_denoise=_optional(params, "upscale_denoise"),
        face_detail_enabled=params.face_detail_enabled,
        face_detail_steps=params.face_detail_steps,
        seed=_optional(params, "seed"),
    )


def video_input(params: resources_pb2.VideoParams) -> VideoInput:
    """The VIDEO parameters as the strategy reads them (duration in seconds)."""
    v = Violations()
    duration = None
    if params.HasField("duration"):
        duration = duration_seconds(params.duration, "params.duration", v)
    return VideoInput(
        base_image_url=params.base_image_url,
        motion_bucket_id=params.motion_bucket_id,
        fps=params.fps,
        duration_s=duration,
        seed=_optional(params, "seed"),
        problems=tuple(v.items),
    )


def background_fixing_input(params: resources_pb2.BackgroundFixingParams) -> BackgroundFixingInput:
    """The BACKGROUND_FIXING parameters as the strategy reads them."""
    return BackgroundFixingInput(
        base_image_url=params.base_image_url,
        background_prompt=params.background_prompt,
        background_image_url=params.background_image_url,
        mask_expansion=params.mask_expansion,
        seed=_optional(params, "seed"),
    )


def image_adjusting_input(params: resources_pb2.ImageAdjustingParams) -> ImageAdjustingInput:
    """The IMAGE_ADJUSTING parameters as the strategy reads them."""
    return ImageAdjustingInput(
        base_image_url=params.base_image_url,
        brightness=_optional(params, "brightness"),
        contrast=_optional(params, "contrast"),
        saturation=_optional(params, "saturation"),
        prompt=params.prompt,
        seed=_optional(params, "seed"),
    )


def face_fixing_input(params: resources_pb2.FaceFixingParams) -> FaceFixingInput:
    """The FACE_FIXING parameters as the strategy reads them."""
    return FaceFixingInput(
        base_image_url=params.base_image_url,
        strength=_optional(params, "strength"),
        prompt=params.prompt,
        seed=_optional(params, "seed"),
    )


def watch_generations(
    request: generation_service_pb2.WatchGenerationsRequest,
) -> tuple[GenerationFilter, int]:
    """The filter and cursor of a WatchGenerations call.

    Raises:
        InvalidArgumentError: a bad filter or cursor, every fault named.
    """
    v = Violations()
    if request.after_cursor < -1:
        v.add("after_cursor", "must be -1 (from now on) or a cursor, 0 or more")
    flt = _filter(request.filter, v)
    check_labels(v, flt.labels, "filter.labels")
    v.raise_if_any()
    return flt, request.after_cursor


def generation_filter(message: generation_service_pb2.GenerationFilter) -> GenerationFilter:
    """The list filter; unknown enum values, too many values or bad times ride along.

    They are the filter's ``problems``, which the list reports with every other fault
    of the request (labels, page size, page token) in one INVALID_ARGUMENT.
    """
    v = Violations()
    result = _filter(message, v)
    return replace(result, problems=tuple(v.items))


def _filter(message: generation_service_pb2.GenerationFilter, v: Violations) -> GenerationFilter:

    def values(field: str, numbers: Any, kind: type[StrEnum]) -> frozenset[str]:
        if len(numbers) > MAX_FILTER_VALUES:
            v.add(f"filter.{field}", f"must have at most {MAX_FILTER_VALUES} values")
            return frozenset()
        out = set()
        for i, number in enumerate(numbers):
            value = from_proto(number, kind)
            if value is None:
                v.add(f"filter.{field}[{i}]", "must be a specified, known value")
            else:
                out.add(value.value)
        return frozenset(out)

    after = before = None
    if message.HasField("create_time_after"):
        after = timestamp_value(message.create_time_after, "filter.create_time_after", v)
    if message.HasField("create_time_before"):
        before = timestamp_value(message.create_time_before, "filter.create_time_before", v)
    return GenerationFilter(
        statuses=values("statuses", message.statuses, GenerationStatus),
        strategies=values("strategies", message.strategies, Strategy),
        types=values("types", message.types, GenerationType),
        labels=dict(message.labels),
        created_after=after,
        created_before=before,
    )
