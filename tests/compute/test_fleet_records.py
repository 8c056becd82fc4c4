"""The fleet's task records against a real Redis: each transition is one atomic script.

A claim keeps every other delivery off the task until its lease lapses; a worker whose
claim lapsed and was taken over writes nothing more (no progress, no result); a task ends
once whatever tries to end it twice; a cancelled pending task is never claimed.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fleet_rig import REDIS_URL, requires_redis

from server.compute.fleet.records import (
    CANCEL,
    CLAIM,
    CREATE,
    FINISH,
    RENEW,
    Keys,
    TaskRecord,
    outputs_json,
)
from server.compute.server.board import NamedOutput

pytestmark = requires_redis
TTL_MS = 60_000


class Records:
    """The scripts of one namespace, called as the API servers and workers call them."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.keys = Keys(f"test:{uuid.uuid4().hex[:12]}")
        self._scripts = {
            name: client.register_script(source)
            for name, source in [
                ("create", CREATE),
                ("claim", CLAIM),
                ("renew", RENEW),
                ("finish", FINISH),
                ("cancel", CANCEL),
            ]
        }

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        answer = self._scripts[name](keys=keys, args=args)
        if isinstance(answer, list):
            return [part.decode() for part in answer]
        return answer.decode()

    def create(self, key: str = "key") -> str:
        task_id = f"task-{uuid.uuid4()}"
        k = self.keys
        named = self._run(
            "create",
            [k.key(key), k.task(task_id), k.pending, k.created],
            [task_id, key, "IMAGE_ADJUSTER", "org", json.dumps({"seed": 1}), "[]"],
        )
        return str(named)

    def claim(self, task_id: str, token: str, lease_ms: int = 60_000) -> list[str]:
        k = self.keys
        return list(
            self._run(
                "claim",
                [k.task(task_id), k.pending, k.running, k.ended, k.key(""), k.events(task_id)],
                [token, lease_ms, TTL_MS],
            )
        )

    def renew(self, task_id: str, token: str, progress: float | str = "") -> str:
        k = self.keys
        return str(
            self._run("renew", [k.task(task_id), k.events(task_id)], [token, 60_000, progress])
        )

    def finish(self, task_id: str, token: str, status: str = "completed") -> str:
        k = self.keys
        output = NamedOutput(sha256="a" * 64, size=3, mime_type="image/png", width=1, height=1)
        return str(
            self._run(
                "finish",
                [k.task(task_id), k.running, k.ended, k.key(""), k.events(task_id)],
                [token, status, outputs_json([output]), "", "", TTL_MS],
            )
        )

    def cancel(self, task_id: str) -> str:
        k = self.keys
        return str(
            self._run(
                "cancel",
                [k.task(task_id), k.pending, k.ended, k.key(""), k.events(task_id)],
                [TTL_MS],
            )
        )

    def record(self, task_id: str) -> TaskRecord:
        return TaskRecord.from_hash(self.client.hgetall(self.keys.task(task_id)))

    def counters(self) -> tuple[int, int, int, int]:
        k = self.keys
        return (
            int(self.client.get(k.created) or 0),
            int(self.client.get(k.ended) or 0),
            int(self.client.scard(k.pending)),
            int(self.client.scard(k.running)),
        )

    def forget(self) -> None:
        for key in self.client.scan_iter(match=f"{self.keys.ns}:*"):
            self.client.delete(key)


@pytest.fixture
def records() -> Iterator[Records]:
    client = redis.Redis.from_url(REDIS_URL)
    made = Records(client)
    try:
        yield made
    finally:
        made.forget()
        client.close()


def test_the_same_key_names_the_same_task(records: Records) -> None:
    first = records.create("same")
    assert records.create("same") == first
    assert records.counters() == (1, 0, 1, 0)


def test_a_claimed_task_is_held_from_every_other_delivery(records: Records) -> None:
    task_id = records.create()
    assert records.claim(task_id, "worker-a") == ["claimed", "1"]
    outcome, left = records.claim(task_id, "worker-b")
    assert outcome == "held"
    assert 0 < int(left) <= 60_000
    assert records.renew(task_id, "worker-b") == "lost"  # b holds nothing
    assert records.renew(task_id, "worker-a", 0.5) == "ok"
    assert records.record(task_id).progress == 0.5
    assert records.counters() == (1, 0, 0, 1)


def test_a_lapsed_claim_is_taken_over_and_its_old_holder_writes_nothing(
    records: Records,
) -> None:
    task_id = records.create()
    assert records.claim(task_id, "worker-a", lease_ms=1) == ["claimed", "1"]
    deadline = time.monotonic() + 5
    while (taken := records.claim(task_id, "worker-b"))[0] == "held":
        assert time.monotonic() < deadline, "a 1 ms lease never lapsed"
    assert taken == ["claimed", "2"]
    assert records.renew(task_id, "worker-a", 0.9) == "lost"
    assert records.finish(task_id, "worker-a") == "lost"
    record = records.record(task_id)
    assert (record.status, record.progress, record.outputs, record.attempts) == (
        "running",
        0.0,
        [],
        2,
    )
    assert records.finish(task_id, "worker-b") == "ok"
    assert records.record(task_id).status == "completed"


def test_a_task_ends_once(records: Records) -> None:
    task_id = records.create()
    records.claim(task_id, "worker-a")
    assert records.finish(task_id, "worker-a") == "ok"
    assert records.finish(task_id, "worker-a") == "lost"  # the claim ended with the task
    assert records.claim(task_id, "worker-b") == ["terminal", ""]
    assert records.cancel(task_id) == "terminal"
    record = records.record(task_id)
    assert (record.status, record.progress, len(record.outputs)) == ("completed", 1.0, 1)
    assert records.counters() == (1, 1, 0, 0)


def test_a_cancelled_pending_task_is_never_claimed(records: Records) -> None:
    task_id = records.create()
    assert records.cancel(task_id) == "cancelled"
    assert records.claim(task_id, "worker-a") == ["terminal", ""]
    assert records.record(task_id).status == "cancelled"
    assert records.counters() == (1, 1, 0, 0)


def test_a_cancel_reaches_the_running_worker_at_its_next_step(records: Records) -> None:
    task_id = records.create()
    records.claim(task_id, "worker-a")
    assert records.cancel(task_id) == "requested"
    assert records.record(task_id).status == "running"
    assert records.renew(task_id, "worker-a", 0.2) == "cancel"
    assert records.finish(task_id, "worker-a", "cancelled") == "ok"
    assert records.record(task_id).status == "cancelled"
    assert records.counters() == (1, 1, 0, 0)


def test_a_dead_workers_cancelled_task_ends_cancelled_at_its_next_delivery(
    records: Records,
) -> None:
    task_id = records.create()
    records.claim(task_id, "worker-a", lease_ms=1)
    assert records.cancel(task_id) == "requested"
    deadline = time.monotonic() + 5
    while (outcome := records.claim(task_id, "worker-b"))[0] == "held":
        assert time.monotonic() < deadline
    assert outcome == ["cancelled", ""]
    assert records.record(task_id).status == "cancelled"
    assert records.counters() == (1, 1, 0, 0)
