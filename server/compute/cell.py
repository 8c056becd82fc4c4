"""The in-memory state of one compute task, shared by the in-process backends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from server.compute.base import OutputFile, TaskSnapshot
from server.domain.enums import TaskStatus
from server.domain.states import TASK_TERMINAL


@dataclass(eq=False)
class TaskCell:
    """A task's status, progress and outputs, with waiting on change; event-loop only."""

    id: str
    status: TaskStatus = TaskStatus.PENDING
    progress: float = 0.0
    outputs: tuple[OutputFile, ...] = ()
    error: tuple[str, str] | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_at: datetime | None = None
    finished_at: datetime | None = None
    version: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def update(self, **changes: Any) -> None:
        """Apply ``changes`` and wake every waiter."""
        for name, value in changes.items():
            setattr(self, name, value)
        now = datetime.now(UTC)
        if self.status is TaskStatus.RUNNING and self.started_at is None:
            self.started_at = now
        if self.status in TASK_TERMINAL and self.finished_at is None:
            self.finished_at = now
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_past(self, version: int) -> None:
        """Return once the task changed after ``version``."""
        while self.version == version:
            await self._changed.wait()

    async def wait_terminal(self) -> None:
        """Return once the task is terminal."""
        while self.status not in TASK_TERMINAL:
            await self.wait_past(self.version)

    def snapshot(self) -> TaskSnapshot:
        """The task as the backend reports it."""
        category, message = self.error or (None, None)
        return TaskSnapshot(self.id, self.status, self.progress, self.outputs, category, message)

    async def follow(self) -> AsyncIterator[TaskSnapshot]:
        """Yield a snapshot now and at every change, ending with the terminal one."""
        seen = -1
        while True:
            await self.wait_past(seen)
            seen = self.version
            snap = self.snapshot()
            yield snap
            if snap.status in TASK_TERMINAL:
                return
