"""Domain enums to proto enum numbers and back; every proto value carries its enum's prefix."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

from sartiq_grpc.sartiq.generation.v1 import enums_pb2
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

E = TypeVar("E", bound=StrEnum)

_PREFIX: dict[type[StrEnum], tuple[str, Any]] = {
    GenerationType: ("GENERATION_TYPE_", enums_pb2.GenerationType),
    Strategy: ("STRATEGY_", enums_pb2.Strategy),
    GenerationStatus: ("GENERATION_STATUS_", enums_pb2.GenerationStatus),
    PredictionStatus: ("PREDICTION_STATUS_", enums_pb2.PredictionStatus),
    TaskStatus: ("COMPUTE_TASK_STATUS_", enums_pb2.ComputeTaskStatus),
    TaskType: ("COMPUTE_TASK_TYPE_", enums_pb2.ComputeTaskType),
    AttemptStatus: ("ATTEMPT_STATUS_", enums_pb2.AttemptStatus),
    StopReason: ("STOP_REASON_", enums_pb2.StopReason),
    EditingTool: ("EDITING_TOOL_", enums_pb2.EditingTool),
    EventKind: ("EVENT_KIND_", enums_pb2.EventKind),
}


def to_proto(value: StrEnum | str, kind: type[StrEnum]) -> Any:
    """The proto number of a domain value (typed Any: each enum has its own stub type)."""
    prefix, wrapper = _PREFIX[kind]
    return wrapper.Value(prefix + str(value))


def from_proto(number: int, kind: type[E]) -> E | None:
    """The domain value of a proto number; None for UNSPECIFIED and unknown numbers."""
    prefix, wrapper = _PREFIX[kind]
    try:
        name = str(wrapper.Name(number))
    except ValueError:
        return None
    name = name.removeprefix(prefix)
    return kind(name) if name in kind.__members__ else None


def proto_name(kind: type[StrEnum], value: StrEnum | str) -> str:
    """The full proto name of a domain value, e.g. ``STRATEGY_GENERATE``."""
    return _PREFIX[kind][0] + str(value)
