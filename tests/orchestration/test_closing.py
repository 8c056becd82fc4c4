"""Closing a generation never raises and always commits a terminal state.

An exception is injected at every step of closing, through the scriptable fake compute
backend and a failing write: the lookup of a task by its idempotency key, the cancel
(a ``ComputeError`` of each kind, an unexpected exception, an unconfirmed release) and
the terminal commit. Each time the generation ends terminal (``done``), its task is
closed with a note saying what compute did, and what compute still held was asked to
let go.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings
from google.protobuf import duration_pb2
from helpers import (
    GenerationStub,
    create_generation,
    generate_request,
    wait_submitted,
    wait_terminal,
)

from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2, resources_pb2
from server.compute.base import ComputeError
from server.compute.fake import FakeComputeBackend
from server.config import ComputeSettings, OrchestrationSettings, Settings
from server.store import writer as writer_module

CANCELLED = enums_pb2.GENERATION_STATUS_CANCELLED
FAILED = enums_pb2.GENERATION_STATUS_FAILED


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """One compute slot; compute calls retried for one second (releases too)."""
    base = make_settings(tmp_path)
    return base.model_copy(
        update={
            "compute": ComputeSettings(retry_budget=1.0),
            "orchestration": OrchestrationSettings(max_tasks_in_flight=1, progress_interval=0),
        }
    )


async def _cancel(stub: GenerationStub, generation_id: str) -> resources_pb2.Generation:
    await stub.CancelGeneration(
        generation_service_pb2.CancelGenerationRequest(generation_id=generation_id)
    )
    return await wait_terminal(stub, generation_id, timeout=20)


def _note(generation: resources_pb2.Generation, index: int = 0) -> str:
    task = generation.predictions[index].tasks[0]
    assert task.status == enums_pb2.COMPUTE_TASK_STATUS_CANCELLED
    return str(task.error.message)


@pytest.mark.parametrize(
    ("faults", "note"),
    [
        ([ComputeError("transient", "connection refused")] * 50, "connection refused"),
        ([ComputeError("validation", "no such route")], "no such route"),
        ([ComputeError("not_a_category", "odd")], "odd"),
        ([RuntimeError("secret detail")], "an unexpected error (logged)"),
        ([KeyError("id")], "an unexpected error (logged)"),
        ([TypeError("'NoneType' object is not subscriptable")], "an unexpected error"),
    ],
    ids=["transient", "permanent", "unknown-category", "runtime", "key", "type"],
)
async def test_a_cancel_that_raises_still_ends_the_generation(
    stub: GenerationStub,
    fake_compute: FakeComputeBackend,
    product_id: str,
    faults: list[Exception],
    note: str,
) -> None:
    fake_compute.hold = True
    generation_id = await create_generation(stub, product_id)
    await wait_submitted(fake_compute, 1)
    fake_compute.cancel_faults = list(faults)
    done = await _cancel(stub, generation_id)
    assert done.status == CANCELLED
    assert done.done
    message = _note(done)
    assert message.startswith("compute did not confirm release")
    assert note in message
    assert "secret" not in message


async def test_an_unconfirmed_release_still_ends_the_generation(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    fake_compute.confirm_cancel = False
    generation_id = await create_generation(stub, product_id)
    await wait_submitted(fake_compute, 1)
    done = await _cancel(stub, generation_id)
    assert done.status == CANCELLED
    assert _note(done) == "compute did not confirm release"


@pytest.mark.parametrize(
    ("fault", "note"),
    [
        (ComputeError("transient", "lookup refused"), "lookup refused"),
        (RuntimeError("secret detail"), "an unexpected error (logged)"),
    ],
    ids=["compute-error", "unexpected"],
)
async def test_a_lookup_that_raises_still_ends_the_generation(
    stub: GenerationStub,
    fake_compute: FakeComputeBackend,
    product_id: str,
    fault: Exception,
    note: str,
) -> None:
    """Two predictions, one compute slot: the second task waits, with no compute id."""
    fake_compute.hold = True
    generation_id = await create_generation(stub, product_id, batch=2)
    await wait_submitted(fake_compute, 1)
    fake_compute.find_faults = [fault] * 50
    done = await _cancel(stub, generation_id)
    assert done.status == CANCELLED
    notes = sorted(_note(done, index) for index in range(2))
    assert notes[0] == "compute confirmed release"
    assert notes[1] == f"compute could not be asked for the task: {note}"


async def test_a_task_whose_submit_raised_is_found_by_its_key_and_released(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    """A submit that created its task and then raised something unexpected."""
    fake_compute.hold = True
    fake_compute.lose_submit_answer = KeyError("id")
    done = await wait_terminal(stub, await create_generation(stub, product_id), timeout=20)
    assert done.status == FAILED
    assert done.error.reason == "INTERNAL"
    (compute_id,) = fake_compute.tasks
    assert fake_compute.cancelled == [compute_id]
    task = done.predictions[0].tasks[0]
    assert task.compute_task_id == compute_id
    assert task.error.message == "compute confirmed release (found by its idempotency key)"


async def test_a_submit_given_up_on_releases_the_task_it_created(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    """Every submit answer lost (transient) past the retry budget: found and released."""
    fake_compute.hold = True
    fake_compute.lose_submit_answer = ComputeError("transient", "answer lost")
    done = await wait_terminal(stub, await create_generation(stub, product_id), timeout=20)
    assert done.status == FAILED
    (compute_id,) = fake_compute.tasks
    assert len(fake_compute.submit_calls) > 1  # retried under the same key
    assert fake_compute.cancelled == [compute_id]
    task = done.predictions[0].tasks[0]
    assert task.status == enums_pb2.COMPUTE_TASK_STATUS_FAILED
    assert task.compute_task_id == compute_id
    assert task.error.message == "answer lost"


class FailingCommits:
    """Makes the next ``count`` writes that end a generation fail, as a refused transaction."""

    def __init__(self, count: int) -> None:
        self.left = count
        self.failed = 0


@pytest.fixture
def failing_commits(monkeypatch: pytest.MonkeyPatch) -> FailingCommits:
    failing = FailingCommits(0)
    submit = writer_module.Writer.submit

    def maybe_fail(self: Any, ops: Any, events: Any, **kwargs: Any) -> Any:
        if failing.left and any(event.terminal for event in events):
            failing.left -= 1
            failing.failed += 1
            refused: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            refused.set_exception(OSError("disk I/O error"))
            return refused
        return submit(self, ops, events, **kwargs)

    monkeypatch.setattr(writer_module.Writer, "submit", maybe_fail)
    return failing


@pytest.mark.parametrize("failures", [1, 3])
async def test_a_terminal_commit_that_fails_is_written_again(
    stub: GenerationStub,
    fake_compute: FakeComputeBackend,
    product_id: str,
    failing_commits: FailingCommits,
    failures: int,
) -> None:
    fake_compute.hold = True
    generation_id = await create_generation(stub, product_id)
    await wait_submitted(fake_compute, 1)
    failing_commits.left = failures
    done = await _cancel(stub, generation_id)  # GetGeneration reads what was committed
    assert failing_commits.failed == failures
    assert done.status == CANCELLED
    assert _note(done) == "compute confirmed release"


async def test_a_deadline_with_a_failing_cancel_and_commit_still_fails_the_generation(
    stub: GenerationStub,
    fake_compute: FakeComputeBackend,
    product_id: str,
    failing_commits: FailingCommits,
) -> None:
    fake_compute.hold = True
    fake_compute.cancel_faults = [RuntimeError("boom")] * 50
    failing_commits.left = 1
    request = generate_request(product_id)
    request.timeout.CopyFrom(duration_pb2.Duration(seconds=1))
    created = (await stub.CreateGenerateGeneration(request)).generation
    done = await wait_terminal(stub, created.id, timeout=20)
    assert done.status == FAILED
    assert done.error.reason == "DEADLINE_EXCEEDED"
    assert failing_commits.failed == 1
    assert _note(done).startswith("compute did not confirm release")
