"""Processors of the local backend, registered by task type; mistakes fail at start-up."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from server.compute.base import ComputeError, OutputFile
from server.domain.enums import TaskType


class ProcessorError(Exception):
    """A processor refused its input (``category`` "validation") or could not finish."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category


@dataclass(frozen=True, slots=True)
class ProcessorContext:
    """What a processor may use besides its parameters.

    ``keep`` lives as long as the worker that runs the processor (its process, its thread
    pool, its Celery process): what a processor puts there (loaded models) the next task
    of the same worker finds again. A worker process or a Celery process runs one task at
    a time; the threads of the ``thread`` isolation share one, so what is kept there must
    be guarded (the diffusion provider locks it).
    """

    resolve: Callable[[str], bytes]
    progress: Callable[[float], None]
    max_input_pixels: int
    keep: dict[str, Any] = field(default_factory=dict)


Processor = Callable[[dict[str, Any], ProcessorContext], list[OutputFile]]


class ProcessorRegistry:
    """Maps each task type to the one function that runs it."""

    def __init__(self, processors: Mapping[TaskType, Processor] | None = None) -> None:
        self._processors: dict[TaskType, Processor] = {}
        for task_type, processor in (processors or {}).items():
            self.register(task_type, processor)

    def register(self, task_type: TaskType, processor: Processor) -> None:
        """Add a processor.

        Raises:
            ValueError: a processor for this task type is registered already.
        """
        if task_type in self._processors:
            raise ValueError(f"a processor for {task_type} is registered already")
        self._processors[task_type] = processor

    @property
    def task_types(self) -> tuple[TaskType, ...]:
        """The task types with a processor, in declaration order."""
        return tuple(t for t in TaskType if t in self._processors)

    def get(self, task_type: TaskType) -> Processor:
        """The processor for ``task_type``.

        Raises:
            ComputeError: category "unsupported", listing what is registered.
        """
        try:
            return self._processors[task_type]
        except KeyError:
            known = ", ".join(sorted(self._processors)) or "none"
            raise ComputeError(
                "unsupported", f"no processor for {task_type}; registered: {known}"
            ) from None
