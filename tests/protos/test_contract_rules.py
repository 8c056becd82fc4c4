"""Rules of the v1 contract that buf lint does not check, enforced on the descriptors."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor

from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2
from sartiq_grpc.sartiq.generation.v1 import (
    artifact_service_pb2,
    enums_pb2,
    generation_service_pb2,
    resources_pb2,
)
from server.domain import errors

ROOT = Path(__file__).resolve().parents[2]
FILES: list[FileDescriptor] = [
    enums_pb2.DESCRIPTOR,
    resources_pb2.DESCRIPTOR,
    generation_service_pb2.DESCRIPTOR,
    artifact_service_pb2.DESCRIPTOR,
    catalog_service_pb2.DESCRIPTOR,
]
LANGUAGE_OPTIONS = (
    "go_package",
    "java_package",
    "java_multiple_files",
    "java_outer_classname",
    "csharp_namespace",
    "php_namespace",
    "ruby_package",
    "objc_class_prefix",
    "swift_prefix",
)
# Type names that collide with built-ins of common client languages (C#, Kotlin, Swift,
# TypeScript, Java).
COLLIDING = {"Task", "TaskStatus", "Error", "Status", "Event", "Exception", "Object", "Type"}


def _messages(file: FileDescriptor) -> list[Descriptor]:
    found: list[Descriptor] = []

    def walk(message: Descriptor) -> None:
        found.append(message)
        for nested in message.nested_types:
            walk(nested)

    for message in file.message_types_by_name.values():
        walk(message)
    return found


def _fields() -> list[FieldDescriptor]:
    return [f for file in FILES for m in _messages(file) for f in m.fields]


@pytest.mark.parametrize("file", FILES, ids=lambda f: f.name)
def test_every_file_sets_every_language_option(file: FileDescriptor) -> None:
    options = file.GetOptions()
    missing = [name for name in LANGUAGE_OPTIONS if not options.HasField(name)]  # type: ignore[arg-type]
    assert missing == []


def test_no_type_collides_with_a_client_language_builtin() -> None:
    names = {m.name for file in FILES for m in _messages(file)}
    names |= {e.name for file in FILES for e in file.enum_types_by_name.values()}
    assert names & COLLIDING == set()


def test_times_are_timestamps_named_time_and_spans_are_durations() -> None:
    for field in _fields():
        kind = field.message_type.full_name if field.message_type else ""
        if kind == "google.protobuf.Timestamp":
            # AIP-142; a filter's bounds on a time read `<time>_after` / `<time>_before`.
            assert field.name.endswith(("_time", "_time_after", "_time_before")), field.full_name
        if field.name.endswith("_time"):
            assert kind == "google.protobuf.Timestamp", field.full_name
        if field.name in ("duration", "timeout"):
            assert kind == "google.protobuf.Duration", field.full_name


def test_resources_with_a_lifecycle_say_when_they_are_done() -> None:
    for name in ("Generation", "Prediction", "ComputeTask", "Attempt"):
        message = resources_pb2.DESCRIPTOR.message_types_by_name[name]
        assert message.fields_by_name["done"].type == FieldDescriptor.TYPE_BOOL
        assert "status" in message.fields_by_name


def test_shapes_that_cannot_change_later() -> None:
    messages = resources_pb2.DESCRIPTOR.message_types_by_name
    refine = messages["RefineParams"].fields_by_name
    assert refine["upscale_denoise"].has_presence  # 0 is meaningful: optional
    shot = messages["OrchestratedShot"].fields_by_name
    assert shot["attempt_count"].type == FieldDescriptor.TYPE_INT32
    assert shot["attempts"].is_repeated
    attempt = messages["Attempt"].fields_by_name
    assert attempt["task_ids"].is_repeated
    assert {"status", "error", "create_time", "finish_time"} <= set(attempt)
    assert "agentic" in messages["Prediction"].fields_by_name
    assert "shot" not in messages["Prediction"].fields_by_name
    assert enums_pb2.COMPUTE_TASK_TYPE_DETAIL_ENHANCER
    error = messages["ResourceError"].fields_by_name
    assert {"code", "reason", "domain", "message", "metadata"} == set(error)


def test_every_reason_the_server_sends_is_documented() -> None:
    service_text = (ROOT / "protos/sartiq/generation/v1/generation_service.proto").read_text()
    resources_text = (ROOT / "protos/sartiq/generation/v1/resources.proto").read_text()
    api_reasons = {
        kind.reason
        for kind in vars(errors).values()
        if isinstance(kind, type)
        and issubclass(kind, errors.DomainError)
        and kind not in (errors.DomainError, errors.IllegalTransitionError)
    }
    api_reasons.add("INTERNAL")
    for reason in api_reasons:
        assert f"reason {reason}" in service_text, reason
    for reason in (
        "CANCELLED",
        "DEADLINE_EXCEEDED",
        "NO_PREDICTION_COMPLETED",
        "COMPUTE_FAILED",
        "INTERNAL",
    ):
        assert f"* {reason} -" in resources_text, reason


def test_names_that_misled_do_not_come_back() -> None:
    messages = resources_pb2.DESCRIPTOR.message_types_by_name
    assert "expire_time" not in messages["Generation"].fields_by_name  # AIP-214: deletion
    assert "deadline_time" in messages["Generation"].fields_by_name
    service = generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"]
    creates = [m.name for m in service.methods if m.name.startswith("Create")]
    # One create per strategy, each named for it; none takes the generic name.
    assert "CreateGeneration" not in creates
    assert all(name.endswith("Generation") and name != "CreateGeneration" for name in creates)
    assert len(creates) == len(enums_pb2.Strategy.values()) - 1
