"""A scriptable in-memory compute backend with fault injection, for tests and benchmarks.

By default every task completes at once with a small PNG. Tests can hold tasks until
released, fail them, or make ``submit``, ``find`` or ``cancel`` raise (any exception, not
only ``ComputeError``), to drive the engine through every path.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import struct
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from server.compute.base import (
    OutputFile,
    TaskRequest,
    TaskSnapshot,
    UnknownComputeTaskError,
)
from server.compute.cell import TaskCell
from server.domain.enums import TaskStatus


def tiny_png(key: str, width: int = 8, height: int = 8) -> OutputFile:
    """A deterministic solid-colour PNG derived from ``key``, encoded directly (no Pillow).

    It stands in for instant compute in benchmarks, so it is kept cheap to make.
    """
    digest = hashlib.sha256(key.encode()).digest()
    row = b"\x00" + digest[:3] * width  # filter byte 0, then RGB pixels
    return OutputFile(_png(width, height, row * height), "image/png", width, height, seed=0)


def _png(width: int, height: int, raw: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 1))
        + chunk(b"IEND", b"")
    )


@dataclass(eq=False)
class FakeTask(TaskCell):
    """A fake task and the request that created it."""

    request: TaskRequest = field(kw_only=True)


class FakeComputeBackend:
    """In-memory backend whose behaviour each test scripts.

    Args:
        hold: keep every task running until the test completes or fails it.
        retain_finished: forget the oldest finished tasks beyond this many, and keep no
            history of calls (for long benchmarks); None keeps everything to inspect.
    """

    name = "fake"

    def __init__(self, *, hold: bool = False, retain_finished: int | None = None) -> None:
        self.hold = hold
        self._retain = retain_finished
        self._finished: deque[str] = deque()
        self.tasks: dict[str, FakeTask] = {}
        self.submit_calls: list[TaskRequest] = []
        self.submitted: list[TaskRequest] = []
        self.cancelled: list[str] = []
        self.found: list[str] = []
        # The next calls raise these, one per call, before doing anything.
        self.submit_faults: list[Exception] = []
        self.find_faults: list[Exception] = []
        self.cancel_faults: list[Exception] = []
        # When set, every submit creates (or finds) its task and then raises this: an
        # answer lost or unreadable after the task was made.
        self.lose_submit_answer: Exception | None = None
        # What cancel() answers: whether compute confirmed the release.
        self.confirm_cancel = True
        self.fail_with: tuple[str, str] | None = None
        # When set and not yet released, cancel() waits for it (a slow compute server).
        self.cancel_gate: asyncio.Event | None = None
        # When set and not yet released, submit() waits for it after accepting the task,
        # as a server that is slow to answer.
        self.submit_gate: asyncio.Event | None = None
        # How many snapshots watch() has handed out, over every task.
        self.snapshots_delivered = 0
        # What a completed task's PNG derives from; None means its compute id, so every
        # output differs. A test sets it to make outputs repeat, byte for byte.
        self.output_key: Callable[[TaskRequest], str] | None = None
        self._by_key: dict[str, str] = {}
        self._ids = itertools.count(1)

    async def submit(self, request: TaskRequest) -> str:
        """Accept a task, or raise the next scripted submit fault.

        Every call is recorded in ``submit_calls`` first, faults and repeated keys
        included; ``submitted`` holds the tasks actually created.
        """
        if self._retain is None:
            self.submit_calls.append(request)
        if self.submit_faults:
            raise self.submit_faults.pop(0)
        if request.idempotency_key in self._by_key:
            if self.lose_submit_answer is not None:
                raise self.lose_submit_answer
            return self._by_key[request.idempotency_key]
        task = FakeTask(id=f"fake-{next(self._ids)}", request=request)
        self.tasks[task.id] = task
        self._by_key[request.idempotency_key] = task.id
        if self._retain is None:
            self.submitted.append(request)
        if self.fail_with is not None:
            self._finish(task, status=TaskStatus.FAILED, error=self.fail_with)
        elif not self.hold:
            self.complete(task.id)
        if self.submit_gate is not None:
            await self.submit_gate.wait()
        if self.lose_submit_answer is not None:
            raise self.lose_submit_answer
        return task.id

    async def find(self, idempotency_key: str) -> str | None:
        """The task this idempotency key created, or the next scripted find fault."""
        self.found.append(idempotency_key)
        if self.find_faults:
            raise self.find_faults.pop(0)
        return self._by_key.get(idempotency_key)

    def progress(self, compute_id: str, value: float) -> None:
        """Report a held task as running with ``value`` progress."""
        self.tasks[compute_id].update(status=TaskStatus.RUNNING, progress=value)

    def complete(self, compute_id: str) -> None:
        """Finish a task successfully with a small PNG of the asked size."""
        task = self.tasks[compute_id]
        params = task.request.params
        key = task.id if self.output_key is None else self.output_key(task.request)
        output = tiny_png(key, int(params.get("width", 8)), int(params.get("height", 8)))
        self._finish(task, status=TaskStatus.COMPLETED, progress=1.0, outputs=(output,))

    def fail(self, compute_id: str, category: str, message: str) -> None:
        """Fail a held task."""
        self._finish(self.tasks[compute_id], status=TaskStatus.FAILED, error=(category, message))

    def _finish(self, task: FakeTask, **change: Any) -> None:
        task.update(**change)
        if self._retain is None:
            return
        self._finished.append(task.id)
        while len(self._finished) > self._retain:
            old = self.tasks.pop(self._finished.popleft(), None)
            if old is not None:
                self._by_key.pop(old.request.idempotency_key, None)

    def forget_all(self) -> None:
        """Lose every task, as a compute server that restarted would."""
        self.tasks.clear()
        self._by_key.clear()

    async def watch(self, compute_id: str) -> AsyncIterator[TaskSnapshot]:
        """Follow a task to its terminal state."""
        task = self.tasks.get(compute_id)
        if task is None:
            raise UnknownComputeTaskError(compute_id)
        async for snap in task.follow():
            self.snapshots_delivered += 1
            yield snap

    async def cancel(self, compute_id: str) -> bool:
        """Cancel a task that is not terminal yet."""
        if self.cancel_gate is not None:
            await self.cancel_gate.wait()
        if self.cancel_faults:
            raise self.cancel_faults.pop(0)
        self.cancelled.append(compute_id)
        task = self.tasks.get(compute_id)
        if task is not None and task.status in (TaskStatus.PENDING, TaskStatus.RUNNING):
            task.update(status=TaskStatus.CANCELLED)
        return self.confirm_cancel

    async def aclose(self) -> None:
        """Nothing to release."""
