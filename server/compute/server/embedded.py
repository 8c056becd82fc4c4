"""The one-process board: tasks in this process's memory, run by the local backend's pool.

For development and tests (``make compute-server`` with no broker configured). Nothing
survives a restart, and a second process does not know this one's tasks: the fleet mode
(``fleet``) is the one to run behind a load balancer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.compute.base import ComputeError, TaskRequest
from server.compute.diffusion import providers
from server.compute.local import LocalComputeBackend, LocalTask
from server.compute.server.board import NamedOutput, OutputBytes, task_output
from server.compute.server.settings import ComputeServerSettings
from server.compute.wire import Capacity, TaskAnswer, WireStatus, decode_data_uri, is_data_uri
from server.domain.enums import ComputeErrorCategory, TaskStatus

WIRE_STATUS: dict[TaskStatus, WireStatus] = {
    TaskStatus.PENDING: "pending",
    TaskStatus.RUNNING: "running",
    TaskStatus.COMPLETED: "completed",
    TaskStatus.FAILED: "failed",
    TaskStatus.CANCELLED: "cancelled",
}


class EmbeddedBoard:
    """A ``TaskBoard`` over one ``LocalComputeBackend``."""

    def __init__(self, settings: ComputeServerSettings) -> None:
        self._settings = settings
        chosen = providers(settings.models)
        self.serving = chosen.serving
        self.backend = LocalComputeBackend(
            chosen.processors,
            resolve=self._resolve,
            workers=settings.workers,
            max_input_pixels=settings.max_input_pixels,
            retain_finished=settings.retain_finished,
        )

    def _resolve(self, reference: str) -> bytes:
        if not is_data_uri(reference):
            raise FileNotFoundError(f"inputs must be data: URIs, got {reference[:40]!r}")
        try:
            return decode_data_uri(reference, self._settings.max_input_bytes)
        except ValueError as exc:
            raise FileNotFoundError(str(exc)) from None

    async def start(self) -> None:
        """Nothing to connect."""

    async def submit(self, request: TaskRequest) -> TaskAnswer:
        """Start the task unless its key started one; CAPACITY past ``max_waiting``."""
        _, waiting = self.backend.load
        known = self.backend.existing(request.idempotency_key)
        if known is None and waiting >= self._settings.max_waiting:
            raise ComputeError(ComputeErrorCategory.CAPACITY, f"{waiting} tasks are waiting")
        compute_id = await self.backend.submit(request)
        return task_answer(self.backend.cell(compute_id))

    async def find(self, idempotency_key: str) -> TaskAnswer | None:
        """The task the key started, while it is retained."""
        compute_id = self.backend.existing(idempotency_key)
        return None if compute_id is None else task_answer(self.backend.cell(compute_id))

    async def get(self, task_id: str) -> TaskAnswer:
        """The task now."""
        return task_answer(self.backend.cell(task_id))

    async def follow(self, task_id: str) -> AsyncIterator[TaskAnswer]:
        """The task at every change of its cell, ending with the terminal state."""
        cell = self.backend.cell(task_id)
        async for _ in cell.follow():
            yield task_answer(cell)

    async def output(self, task_id: str, index: int) -> OutputBytes | None:
        """An output's bytes, kept in memory with its task."""
        cell = self.backend.cell(task_id)
        if cell.status is not TaskStatus.COMPLETED or not 0 <= index < len(cell.outputs):
            return None
        output = cell.outputs[index]
        return OutputBytes(output.data, output.mime_type)

    async def cancel(self, task_id: str) -> TaskAnswer:
        """Stop the task and wait until its worker slot is free."""
        cell = self.backend.cell(task_id)
        await self.backend.cancel(cell.id)
        return task_answer(cell)

    async def capacity(self) -> tuple[Capacity, int, int]:
        """The pool's size and load, and the backend's counters."""
        running, waiting = self.backend.load
        capacity = Capacity(workers=self._settings.workers, running=running, waiting=waiting)
        return capacity, self.backend.created, self.backend.ended

    async def aclose(self) -> None:
        """Stop the pool."""
        await self.backend.aclose()


def task_answer(cell: LocalTask) -> TaskAnswer:
    """The wire answer for a task: its state, and each output named by hash and size."""
    category, message = cell.error or (None, None)
    outputs = [NamedOutput.of(o, d) for o, d in zip(cell.outputs, cell.digests, strict=True)]
    return TaskAnswer(
        id=cell.id,
        idempotency_key=cell.request.idempotency_key,
        task_type=cell.request.task_type.value,
        status=WIRE_STATUS[cell.status],
        progress=cell.progress,
        created_at=cell.created_at,
        started_at=cell.started_at,
        completed_at=cell.finished_at,
        output=task_output(cell.id, outputs),
        error_category=category,
        error_message=message,
    )
