"""The local compute backend: runs task processors on this machine's CPU, off the event loop.

Every output a processor returns is probed in the worker thread before the task counts as
completed (``outputs.probed``): its mime type and media facts are what the bytes decode
to, and a processor that returns something undecodable fails its task instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from server.compute.base import OutputFile, TaskRequest, TaskSnapshot, UnknownComputeTaskError
from server.compute.cell import TaskCell
from server.compute.outputs import probed
from server.compute.registry import ProcessorContext, ProcessorError, ProcessorRegistry
from server.domain.enums import TaskStatus
from server.media.probe import InvalidMediaError

log = logging.getLogger(__name__)


class _CancelledError(Exception):
    """Raised inside a processor thread when its task was cancelled."""


@dataclass(eq=False)
class LocalTask(TaskCell):
    """A task of this backend: its state, its request and its cancel flag."""

    request: TaskRequest = field(kw_only=True)
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    # The SHA-256 of each output, computed once in the worker (the wire names outputs by it).
    digests: tuple[str, ...] = ()


class LocalComputeBackend:
    """Runs each task's processor in a thread pool and reports progress as it goes."""

    name = "local"

    def __init__(
        self,
        processors: ProcessorRegistry,
        *,
        resolve: Callable[[str], bytes],
        workers: int,
        max_input_pixels: int,
        retain_finished: int = 64,
    ) -> None:
        self._processors = processors
        self._resolve = resolve
        self._max_input_pixels = max_input_pixels
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compute")
        self._tasks: dict[str, LocalTask] = {}
        self._by_key: dict[str, str] = {}
        self._runners: set[asyncio.Task[None]] = set()
        # Finished tasks (and their output bytes) are kept for late readers, up to a bound.
        self._finished: deque[str] = deque()
        self._retain_finished = retain_finished
        self._closed = False
        # Every task ever created, and every one that reached a terminal state.
        self.created = 0
        self.ended = 0

    async def submit(self, request: TaskRequest) -> str:
        """Start the task unless this idempotency key already started one."""
        if self._closed:
            raise RuntimeError("backend is closed")
        existing = self._by_key.get(request.idempotency_key)
        if existing is not None:
            return existing
        self._processors.get(request.task_type)  # unsupported types fail here, at once
        task = LocalTask(id=f"local-{uuid.uuid4()}", request=request)
        self.created += 1
        self._tasks[task.id] = task
        self._by_key[request.idempotency_key] = task.id
        runner = asyncio.create_task(self._run(task), name=f"compute:{task.id}")
        self._runners.add(runner)
        runner.add_done_callback(self._runners.discard)
        return task.id

    async def watch(self, compute_id: str) -> AsyncIterator[TaskSnapshot]:
        """Yield a snapshot at every change until the task is terminal."""
        task = self._tasks.get(compute_id)
        if task is None:
            raise UnknownComputeTaskError(compute_id)
        async for snap in task.follow():
            yield snap

    def cell(self, compute_id: str) -> LocalTask:
        """The task's current state (for the compute server's status answers).

        Raises:
            UnknownComputeTaskError: no such task (or it was retired).
        """
        task = self._tasks.get(compute_id)
        if task is None:
            raise UnknownComputeTaskError(compute_id)
        return task

    def existing(self, idempotency_key: str) -> str | None:
        """The compute id this idempotency key started, if it is still known."""
        return self._by_key.get(idempotency_key)

    async def find(self, idempotency_key: str) -> str | None:
        """The compute id this idempotency key started, if it is still known."""
        return self.existing(idempotency_key)

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) tasks right now."""
        running = sum(t.status is TaskStatus.RUNNING for t in self._tasks.values())
        waiting = sum(t.status is TaskStatus.PENDING for t in self._tasks.values())
        return running, waiting

    async def cancel(self, compute_id: str) -> bool:
        """Stop the task; True once it is terminal (its worker slot released)."""
        task = self._tasks.get(compute_id)
        if task is None:
            return True
        task.cancel_flag.set()
        await task.wait_terminal()
        return True

    async def aclose(self) -> None:
        """Abandon running tasks and stop the worker threads."""
        self._closed = True
        for task in self._tasks.values():
            task.cancel_flag.set()
        for runner in list(self._runners):
            runner.cancel()
        for runner in list(self._runners):
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        # Off the loop: a worker may be waiting on the loop for an input (a storage read).
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    @staticmethod
    def _progress_from_thread(
        loop: asyncio.AbstractEventLoop, task: LocalTask
    ) -> Callable[[float], None]:
        def report(value: float) -> None:
            if task.cancel_flag.is_set():
                raise _CancelledError
            clamped = min(max(value, 0.0), 1.0)
            with contextlib.suppress(RuntimeError):  # the loop closed under a dying worker
                loop.call_soon_threadsafe(lambda: task.update(progress=clamped))

        return report

    async def _run(self, task: LocalTask) -> None:
        loop = asyncio.get_running_loop()
        processor = self._processors.get(task.request.task_type)
        report = self._progress_from_thread(loop, task)
        context = ProcessorContext(
            resolve=self._resolve, progress=report, max_input_pixels=self._max_input_pixels
        )

        def work() -> list[OutputFile]:
            # In the worker thread: PENDING until a worker actually picks the task up.
            if task.cancel_flag.is_set():
                raise _CancelledError
            loop.call_soon_threadsafe(lambda: task.update(status=TaskStatus.RUNNING))
            return _verified(processor(task.request.params, context))

        try:
            outputs = await loop.run_in_executor(self._executor, work)
        except _CancelledError:
            task.update(status=TaskStatus.CANCELLED)
        except ProcessorError as exc:
            task.update(status=TaskStatus.FAILED, error=(exc.category, str(exc)))
        except Exception:
            log.exception("processor for %s failed", task.request.task_type)
            task.update(
                status=TaskStatus.FAILED, error=("internal", "processor failed unexpectedly")
            )
        else:
            if task.cancel_flag.is_set():
                task.update(status=TaskStatus.CANCELLED)
            else:
                digests = tuple(hashlib.sha256(o.data).hexdigest() for o in outputs)
                task.digests = digests
                task.update(status=TaskStatus.COMPLETED, progress=1.0, outputs=tuple(outputs))
        self._retire(task)

    def _retire(self, task: LocalTask) -> None:
        """Remember a finished task, forgetting the oldest beyond the retention bound."""
        self.ended += 1
        self._finished.append(task.id)
        while len(self._finished) > self._retain_finished:
            old = self._tasks.pop(self._finished.popleft())
            self._by_key.pop(old.request.idempotency_key, None)


def _verified(outputs: list[OutputFile]) -> list[OutputFile]:
    """The processor's outputs, each probed; in the worker thread.

    Raises:
        ProcessorError: an output is not a decodable image or video (category internal).
    """
    if not outputs:
        raise ProcessorError("internal", "the processor returned no output")
    try:
        return [probed(o.data, seed=o.seed, notes=o.notes) for o in outputs]
    except InvalidMediaError as exc:
        raise ProcessorError(
            "internal", f"the processor returned an output that does not decode: {exc}"
        ) from None
