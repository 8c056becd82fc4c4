"""The compute backend interface every backend (local, http, fake) implements.

ComputeError                 a task could not be run; ``category`` says why
└── UnknownComputeTaskError  the backend has no task with that id (e.g. it restarted)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.domain.enums import ComputeErrorCategory, TaskStatus, TaskType


class ComputeError(Exception):
    """A compute call failed.

    Attributes:
        category: why (see ``ComputeErrorCategory``); a category this service does not
            know is taken as INTERNAL.
        message: what the backend said.
    """

    def __init__(self, category: ComputeErrorCategory | str, message: str) -> None:
        try:
            known = ComputeErrorCategory(category)
        except ValueError:
            known = ComputeErrorCategory.INTERNAL
        super().__init__(f"{known}: {message}")
        self.category = known
        self.message = message

    @property
    def transient(self) -> bool:
        """Whether retrying the same call may succeed (TRANSIENT or CAPACITY)."""
        return self.category in (ComputeErrorCategory.TRANSIENT, ComputeErrorCategory.CAPACITY)


class UnknownComputeTaskError(ComputeError):
    """The backend does not know the task id."""

    def __init__(self, compute_id: str) -> None:
        super().__init__("not_found", f"unknown compute task {compute_id}")


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """A task to run, as the orchestration engine sends it."""

    task_type: TaskType
    params: dict[str, Any]
    idempotency_key: str
    organization: str


@dataclass(frozen=True, slots=True)
class OutputFile:
    """One output of a finished task.

    Backends build it from a probe of the bytes (``outputs.probed``): the mime type and
    the media facts are what the bytes are, not what a producer said.
    """

    data: bytes
    mime_type: str
    width: int
    height: int
    seed: int
    duration_s: float | None = None
    frame_count: int = 0
    # Findings worth telling the caller, e.g. "no face detected; the image is unchanged".
    notes: tuple[str, ...] = ()
    # What produced it beyond the task's parameters (the diffusion provider: model,
    # pipeline, scheduler, steps, guidance, LoRAs); empty for the CPU processors.
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TaskSnapshot:
    """The state of a compute task at one moment."""

    compute_id: str
    status: TaskStatus
    progress: float = 0.0
    outputs: tuple[OutputFile, ...] = ()
    error_category: str | None = None
    error_message: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ComputeBackend(Protocol):
    """What the engine needs from a compute backend."""

    name: str

    async def submit(self, request: TaskRequest) -> str:
        """Start a task; the same idempotency key always yields the same compute id."""
        ...

    def watch(self, compute_id: str) -> AsyncIterator[TaskSnapshot]:
        """Yield snapshots as the task progresses, ending with a terminal one.

        Raises:
            UnknownComputeTaskError: the backend has no such task.
        """
        ...

    async def find(self, idempotency_key: str) -> str | None:
        """The compute id of the task this idempotency key created, None if there is none.

        How a task whose submit answer was lost (or unreadable) is found to be released.
        """
        ...

    async def cancel(self, compute_id: str) -> bool:
        """Ask the backend to stop the task; True once it confirmed the release."""
        ...

    async def aclose(self) -> None:
        """Release every resource; running tasks are abandoned."""
        ...
