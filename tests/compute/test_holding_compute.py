"""The replica tests' holding compute server, checked through the real HTTP adapter.

``tests/holding_compute.py`` must speak the wire protocol well enough for the service's
own adapter: hold a task until released, complete it with an output that passes the
adapter's verification, cancel it, answer a lookup by key; and it must count what the
replica tests assert on: every submit of a key and who sent it, who followed and who
cancelled a task.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import cast

import pytest
from replica_rig import Compute

from server.compute.base import TaskRequest, TaskSnapshot
from server.compute.http import HttpComputeBackend
from server.domain.enums import TaskStatus, TaskType


@pytest.fixture
async def compute(tmp_path: Path) -> AsyncIterator[Compute]:
    server = Compute(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _unused(reference: str) -> bytes:
    raise FileNotFoundError(reference)


def _request(key: str) -> TaskRequest:
    return TaskRequest(
        task_type=TaskType.GENERATION,
        params={"width": 64, "height": 48, "prompt": "a dress"},
        idempotency_key=key,
        organization="default",
    )


async def _last(backend: HttpComputeBackend, compute_id: str) -> TaskSnapshot:
    snapshots = [snapshot async for snapshot in backend.watch(compute_id)]
    return snapshots[-1]


async def test_holds_until_released_counts_submits_and_names_callers(compute: Compute) -> None:
    first = HttpComputeBackend(compute.url, resolve=_unused, token="replica-a#0")
    second = HttpComputeBackend(compute.url, resolve=_unused, token="replica-b#0")
    try:
        held = await first.submit(_request("key-1"))
        other = await first.submit(_request("key-2"))
        assert await second.submit(_request("key-1")) == held  # same key, same task
        assert await second.find("key-1") == held
        assert await first.find("key-unknown") is None
        watching = cast(AsyncGenerator[TaskSnapshot, None], first.watch(held))
        snapshot = await anext(watching)
        assert snapshot.status is TaskStatus.RUNNING
        await watching.aclose()
        await compute.release(["key-1"])
        done = await _last(second, held)
        assert done.status is TaskStatus.COMPLETED
        (output,) = done.outputs
        assert (output.mime_type, output.width, output.height) == ("image/png", 64, 48)
        assert await second.cancel(other)
        assert (await _last(first, other)).status is TaskStatus.CANCELLED
        tasks = await compute.tasks()
    finally:
        await first.aclose()
        await second.aclose()
    assert tasks["key-1"]["submits"] == ["replica-a#0", "replica-b#0"]
    assert tasks["key-1"]["submitted_by"] == "replica-a#0"
    assert set(tasks["key-1"]["followers"]) == {"replica-a#0", "replica-b#0"}
    assert tasks["key-1"]["status"] == "completed"
    assert tasks["key-2"]["submits"] == ["replica-a#0"]
    assert tasks["key-2"]["cancels"] == ["replica-b#0"]
    assert tasks["key-2"]["status"] == "cancelled"


async def test_timed_mode_completes_tasks_after_their_hold(compute: Compute) -> None:
    backend = HttpComputeBackend(compute.url, resolve=_unused, token="replica-a#0")
    try:
        waiting = await backend.submit(_request("before"))
        await compute.hold_for(0.2)
        timed = await backend.submit(_request("after"))
        assert (await _last(backend, timed)).status is TaskStatus.COMPLETED
        assert (await _last(backend, waiting)).status is TaskStatus.COMPLETED
    finally:
        await backend.aclose()
