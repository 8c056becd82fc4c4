"""The wire schema: what a valid answer is, and what is refused (never echoing the values)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from faultproxy import NO_FIELDS, NOT_OBJECTS
from pydantic import BaseModel

from server.compute.wire import (
    ErrorBody,
    EvaluationAnswer,
    HealthAnswer,
    OutputItem,
    TaskAnswer,
    TaskList,
    WireFormatError,
    parse,
)
from server.domain.enums import TaskStatus

SHA = "a" * 64


def _task(**changes: Any) -> bytes:
    answer: dict[str, Any] = {
        "id": "local-1",
        "idempotency_key": "k",
        "task_type": "GENERATION",
        "status": "completed",
        "progress": 1.0,
        "output": {
            "images": [{"url": "/api/v1/tasks/local-1/outputs/0", "sha256": SHA, "size": 3}]
        },
    }
    answer.update(changes)
    return json.dumps(answer).encode()


def test_a_complete_task_answer_parses() -> None:
    task = parse(TaskAnswer, _task(extra_field="ignored, for newer servers"))
    assert task.task_status is TaskStatus.COMPLETED
    (item,) = task.output.items
    assert (item.sha256, item.size) == (SHA, 3)


@pytest.mark.parametrize("model", [TaskAnswer, TaskList, HealthAnswer, EvaluationAnswer])
@pytest.mark.parametrize("body", [*NOT_OBJECTS, *NO_FIELDS, b"", b"{", b"\xff"])
def test_what_is_not_an_answer_is_a_wire_format_error(model: type[BaseModel], body: bytes) -> None:
    with pytest.raises(WireFormatError, match=f"not a valid {model.__name__}"):
        parse(model, body)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"status": "paused"}, "status"),
        ({"status": "COMPLETED"}, "status"),
        ({"progress": 1.5}, "progress"),
        ({"progress": "0.5"}, "progress"),  # strict: a string is not a number
        ({"id": "../../health"}, "id"),
        ({"id": "local-1?x=1"}, "id"),
        ({"id": ""}, "id"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"output": {"images": []}}, "at least one output"),
        ({"output": {"images": [{"url": "u", "sha256": SHA.upper(), "size": 3}]}}, "sha256"),
        ({"output": {"images": [{"url": "u", "sha256": SHA + "\n", "size": 3}]}}, "sha256"),
        ({"output": {"images": [{"url": "u", "sha256": SHA, "size": 0}]}}, "size"),
        ({"output": {"images": [{"url": "u", "sha256": SHA, "size": "3"}]}}, "size"),
        ({"output": {"images": [{"url": "u", "size": 3}]}}, "sha256"),
    ],
)
def test_a_task_answer_out_of_bounds_is_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(WireFormatError, match=field):
        parse(TaskAnswer, _task(**changes))


def test_refusals_name_fields_but_never_echo_values() -> None:
    secret = "s3cr3t-value-from-a-hostile-server"
    with pytest.raises(WireFormatError) as caught:
        parse(TaskAnswer, _task(status=secret, id=secret))
    assert secret not in str(caught.value)
    assert "status" in str(caught.value)


def test_numbers_must_be_finite_and_scores_in_range() -> None:
    with pytest.raises(WireFormatError, match="score"):
        parse(EvaluationAnswer, b'{"score": 1.5, "criteria": {}}')
    with pytest.raises(WireFormatError, match="criteria"):
        parse(EvaluationAnswer, b'{"score": 0.5, "criteria": {"sharpness": -1}}')
    with pytest.raises(WireFormatError):
        parse(EvaluationAnswer, b'{"score": NaN, "criteria": {}}')


def test_error_bodies_are_read_leniently() -> None:
    assert parse(ErrorBody, b"{}") == ErrorBody()
    body = parse(ErrorBody, b'{"error_category": "validation", "error_message": "bad"}')
    assert (body.error_category, body.error_message) == ("validation", "bad")


def test_health_counts_live_tasks() -> None:
    health = parse(
        HealthAnswer,
        b'{"status": "ok", "capacity": {"workers": 2, "running": 1, "waiting": 3},'
        b' "tasks_created": 9, "tasks_ended": 5}',
    )
    assert health.live == 4


@pytest.mark.parametrize(
    "recipe",
    [
        {"model": {"nested": "object"}},  # not a scalar, not a list of records
        {"model": "x" * 2049},  # past the bound of a value
        {f"k{i}": 1 for i in range(33)},  # more keys than a recipe holds
        {"loras": [{"role": {"deep": 1}}]},  # a record holding an object
    ],
)
def test_an_output_recipe_outside_the_schema_is_refused(recipe: dict[str, Any]) -> None:
    item = {"url": "/api/v1/tasks/t/outputs/0", "sha256": "a" * 64, "size": 1, "recipe": recipe}
    with pytest.raises(WireFormatError):
        parse(OutputItem, json.dumps(item).encode())


def test_health_providers_must_be_records_of_words() -> None:
    health: dict[str, Any] = {"status": "ok", "tasks_created": 0, "tasks_ended": 0}
    health["capacity"] = {"workers": 1, "running": 0, "waiting": 0}
    for providers in ({"GENERATION": "diffusion"}, {"GENERATION": {"model": None}}):
        with pytest.raises(WireFormatError):
            parse(HealthAnswer, json.dumps({**health, "providers": providers}).encode())
    fine = parse(
        HealthAnswer, json.dumps({**health, "providers": {"EDITING": {"provider": "cpu"}}}).encode()
    )
    assert fine.providers == {"EDITING": {"provider": "cpu"}}
