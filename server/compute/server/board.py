"""What the compute server's HTTP API needs from whatever keeps and runs its tasks.

Two boards implement it: ``EmbeddedBoard`` (one process: an in-memory task table and the
local backend's worker pool, no broker) and ``FleetBoard`` (stateless API servers over task
records in Redis, Celery workers over a broker, outputs in object storage). The routes in
``app`` speak the wire protocol over either, so both answer exactly the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from server.compute.base import TaskRequest
from server.compute.wire import Capacity, TaskAnswer


@dataclass(frozen=True, slots=True)
class OutputBytes:
    """One output's bytes and their mime type."""

    data: bytes
    mime_type: str


class TaskBoard(Protocol):
    """The task table behind the wire protocol; every answer is a ``wire.TaskAnswer``."""

    async def start(self) -> None:
        """Connect whatever the board needs."""
        ...

    async def submit(self, request: TaskRequest) -> TaskAnswer:
        """Create the task, or answer the one its idempotency key created.

        Raises:
            ComputeError: VALIDATION or UNSUPPORTED (bad request), CAPACITY (too many
                waiting), TRANSIENT (the shared storage is unreachable).
        """
        ...

    async def find(self, idempotency_key: str) -> TaskAnswer | None:
        """The task this idempotency key created, if it is still known."""
        ...

    async def get(self, task_id: str) -> TaskAnswer:
        """The task now.

        Raises:
            UnknownComputeTaskError: no such task (or it was retired).
        """
        ...

    def follow(self, task_id: str) -> AsyncIterator[TaskAnswer]:
        """The task now, then at every change, ending with its terminal state.

        Raises:
            UnknownComputeTaskError: no such task (before anything is yielded).
        """
        ...

    async def output(self, task_id: str, index: int) -> OutputBytes | None:
        """Output ``index`` of a completed task; None when there is no such output.

        Raises:
            UnknownComputeTaskError: no such task.
        """
        ...

    async def cancel(self, task_id: str) -> TaskAnswer:
        """Stop the task (idempotent); answers it, terminal once the stop is confirmed.

        A pending task never starts; a running one stops between two of its steps.

        Raises:
            UnknownComputeTaskError: no such task.
        """
        ...

    async def capacity(self) -> tuple[Capacity, int, int]:
        """(capacity, tasks ever created, tasks ever ended)."""
        ...

    async def aclose(self) -> None:
        """Release everything; never raises."""
        ...
