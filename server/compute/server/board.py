"""What the compute server's HTTP API needs from whatever keeps and runs its tasks.

Two boards implement it: ``EmbeddedBoard`` (one process: an in-memory task table and the
local backend's worker pool, no broker) and ``FleetBoard`` (stateless API servers over task
records in Redis, Celery workers over a broker, outputs in object storage). The routes in
``app`` speak the wire protocol over either, so both answer exactly the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from server.compute.base import OutputFile, TaskRequest
from server.compute.wire import Capacity, OutputItem, TaskAnswer, TaskOutput, output_path


@dataclass(frozen=True, slots=True)
class OutputBytes:
    """One output's bytes and their mime type."""

    data: bytes
    mime_type: str


class NamedOutput(BaseModel):
    """One output of a completed task, named by its bytes: what a status answer says of it."""

    model_config = ConfigDict(frozen=True)

    sha256: str
    size: int = Field(ge=1)
    mime_type: str
    width: int = 0
    height: int = 0
    seed: int = 0
    duration_s: float | None = None
    frame_count: int = 0
    notes: list[str] = Field(default_factory=list)
    recipe: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, output: OutputFile, sha256: str) -> NamedOutput:
        """The facts of a probed output whose bytes hash to ``sha256``."""
        return cls(
            sha256=sha256,
            size=len(output.data),
            mime_type=output.mime_type,
            width=output.width,
            height=output.height,
            seed=output.seed,
            duration_s=output.duration_s,
            frame_count=output.frame_count,
            notes=list(output.notes),
            recipe=dict(output.recipe),
        )


def task_output(task_id: str, outputs: Sequence[NamedOutput]) -> TaskOutput:
    """A completed task's outputs on the wire: each at its output path, images and videos."""
    images: list[OutputItem] = []
    videos: list[OutputItem] = []
    for index, output in enumerate(outputs):
        item = OutputItem(url=output_path(task_id, index), **output.model_dump())
        (videos if output.mime_type.startswith("video/") else images).append(item)
    return TaskOutput(images=images, videos=videos)


class TaskBoard(Protocol):
    """The task table behind the wire protocol; every answer is a ``wire.TaskAnswer``."""

    serving: dict[str, dict[str, str]]  # task type -> its provider (and model, pipeline)

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
