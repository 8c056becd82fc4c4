"""The local compute backend: runs task processors on this machine's CPU, off the event loop.

Processors run in worker processes (``isolation="process"``, what the service and the
compute server use): rendering holds the GIL for most of its time, and in threads of the
server's own process it took the GIL from the event loop, which then waited for it after
every socket write, database call and wake-up. A worker process has its own interpreter,
and it runs at a lower CPU priority (``os.nice``; with ``idle``, Linux's ``SCHED_IDLE``
as well: it gets a CPU only when no other thread wants one, and yields it the moment one
does), so on a busy machine the event loop's work comes first.

How a task runs in a process
    There are ``workers`` slots, handed out first come, first served; a task is PENDING
    until it has one and its worker has picked it up. Each slot has one worker process
    (started with ``spawn``, never ``fork``: the server has threads and an event loop;
    started at the first task that needs it, and again after one died), reached through
    one socket pair: the parent's end is an asyncio stream, the worker's a blocking
    ``multiprocessing`` connection, with the same framing (a 4-byte big-endian length,
    then a pickle) both ways.

    1. The parent resolves the task's input references itself, off the loop
       (``asyncio.to_thread``): every string in the parameters goes through ``resolve``,
       and the worker gets the answers as a mapping, bytes or the error the parent got.
       The worker has no event loop and no storage; its ``ctx.resolve`` looks the string up
       and raises what the parent's ``resolve`` raised, so an input that cannot be read
       fails the task exactly as before (a ``FileNotFoundError`` is the processor's to
       turn into a validation failure; anything else fails it as internal).
    2. The parent sends ``("run", seq, processor, params, inputs, max_input_pixels)``;
       processors are pickled by reference, so they must be importable module-level
       functions (the ``thread`` isolation runs any callable).
    3. The worker answers ``("running",)``, ``("progress", value)`` (at most one every
       ``PROGRESS_INTERVAL_S``), then one of ``("done", outputs, digests)``,
       ``("failed", category, message)``, ``("cancelled",)`` or ``("error", traceback)``,
       in that order on the one stream, so the outcome is never overtaken by a progress
       report. Outputs are probed (``outputs.verified``) and hashed in the worker.
    4. Cancel: the parent writes ``("cancel", seq)``. The worker looks for it before it
       starts the processor and at every ``ctx.progress`` call (a ``poll`` of its socket,
       no shared memory, no lock), and then raises in the processor; a cancel that arrives
       after its task ended is recognised by its ``seq`` and dropped.
    5. A worker that dies (SIGKILL, a crash in native code) closes its end: the parent
       reads end of file, reaps the process and fails the task as internal, and the slot
       gets a fresh worker for its next task (as it does when its worker is found dead
       between tasks). A parent that dies the same way leaves its workers end of file
       too: they exit at their next progress call or task.

``spawn`` starts each worker as a fresh interpreter with this process's ``sys.path`` and
environment; like any ``spawn``, it imports the program's main module first, so that
module must be importable without side effects (the ``if __name__ == "__main__":``
idiom; the service's entry points are).

``aclose`` closes every stream (workers exit), waits ``STOP_GRACE_S`` for them, then
terminates and, if need be, kills them, and reaps every one.

``isolation="thread"`` keeps the processors in a thread pool of this process; it accepts
any callable (tests use closures) and reads inputs lazily through ``resolve`` as they run.
In both, every output a processor returns is probed before the task counts as completed
(``outputs.probed``): its mime type and media facts are what the bytes decode to, and a
processor that returns something undecodable fails its task instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from typing import Any, Literal

from server.compute.base import OutputFile, TaskRequest, TaskSnapshot, UnknownComputeTaskError
from server.compute.cell import TaskCell
from server.compute.outputs import verified
from server.compute.registry import Processor, ProcessorContext, ProcessorError, ProcessorRegistry
from server.domain.enums import TaskStatus, TaskType

log = logging.getLogger(__name__)

Isolation = Literal["process", "thread"]
# The most progress reports a worker process sends per second of a task (the first at once).
PROGRESS_INTERVAL_S = 0.1
# How long ``aclose`` waits for a worker process to exit before it terminates it.
STOP_GRACE_S = 2.0
_HEADER = struct.Struct("!i")  # multiprocessing.connection's framing: length, then bytes
_LONG_HEADER = struct.Struct("!Q")  # after a length of -1, for messages over 2 GiB


class _CancelledError(Exception):
    """Raised inside a processor when its task was cancelled."""


class _InputError(Exception):
    """An input the parent could not read for a reason other than its absence."""


@dataclass(eq=False)
class LocalTask(TaskCell):
    """A task of this backend: its state, its request and its cancel flag."""

    request: TaskRequest = field(kw_only=True)
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    # The SHA-256 of each output, computed once in the worker (the wire names outputs by it).
    digests: tuple[str, ...] = ()


class LocalComputeBackend:
    """Runs each task's processor in a worker process (or thread), reporting progress."""

    name = "local"

    @property
    def task_types(self) -> tuple[TaskType, ...]:
        """The task types it has a processor for."""
        return self._processors.task_types

    def __init__(
        self,
        processors: ProcessorRegistry,
        *,
        resolve: Callable[[str], bytes],
        workers: int,
        max_input_pixels: int,
        retain_finished: int = 64,
        isolation: Isolation = "process",
        nice: int = 10,
        idle: bool = False,
    ) -> None:
        """A backend with ``workers`` slots.

        Args:
            processors: the processor of each task type.
            resolve: reads an input reference (blocking; called off the event loop).
            workers: how many tasks run at once (worker processes or threads).
            max_input_pixels: the largest input image a processor decodes.
            retain_finished: how many finished tasks are kept for late readers.
            isolation: "process" (worker processes, processors importable functions) or
                "thread" (a thread pool of this process, any callable).
            nice: how much lower the worker processes' CPU priority is (``os.nice``).
            idle: run the worker processes under ``SCHED_IDLE`` too, where the system has
                it (Linux): any other runnable thread of the machine goes first.
        """
        self._processors = processors
        self._slots = _Slots(range(workers))
        self._runner: _Runner
        if isolation == "process":
            self._runner = _Processes(workers, resolve, max_input_pixels, _Priority(nice, idle))
        else:
            self._runner = _Threads(workers, resolve, max_input_pixels)
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
        if not self._slots.withdraw(task.id):  # a waiting task ends at once
            self._runner.cancel(task)
        await task.wait_terminal()
        return True

    async def aclose(self) -> None:
        """Abandon running tasks and stop the workers (processes: none is left)."""
        self._closed = True
        for task in self._tasks.values():
            task.cancel_flag.set()
        for runner in list(self._runners):
            runner.cancel()
        for runner in list(self._runners):
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        await self._runner.aclose()

    async def _run(self, task: LocalTask) -> None:
        processor = self._processors.get(task.request.task_type)
        try:
            slot = await self._slots.take(task.id)
        except _CancelledError:
            task.update(status=TaskStatus.CANCELLED)
            self._retire(task)
            return
        try:
            outputs, digests = await self._runner.run(slot, task, processor)
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
                task.digests = digests
                task.update(status=TaskStatus.COMPLETED, progress=1.0, outputs=tuple(outputs))
        finally:
            self._slots.give(slot)
        self._retire(task)

    def _retire(self, task: LocalTask) -> None:
        """Remember a finished task, forgetting the oldest beyond the retention bound."""
        self.ended += 1
        self._finished.append(task.id)
        while len(self._finished) > self._retain_finished:
            old = self._tasks.pop(self._finished.popleft())
            self._by_key.pop(old.request.idempotency_key, None)


class _Slots:
    """The worker slots, handed out first come, first served; a waiter can be withdrawn."""

    def __init__(self, slots: range) -> None:
        self._free: deque[int] = deque(slots)
        self._waiters: OrderedDict[str, asyncio.Future[int]] = OrderedDict()

    async def take(self, task_id: str) -> int:
        """A free slot, once it is this task's turn.

        Raises:
            _CancelledError: the task was withdrawn (cancelled) while it waited.
        """
        if self._free and not self._waiters:
            return self._free.popleft()
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[task_id] = waiter
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.give(waiter.result())  # handed a slot in the same moment: pass it on
            raise
        finally:
            self._waiters.pop(task_id, None)

    def give(self, slot: int) -> None:
        """Hand ``slot`` to the first waiter, or keep it free."""
        while self._waiters:
            _, waiter = self._waiters.popitem(last=False)
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)

    def withdraw(self, task_id: str) -> bool:
        """End the wait of ``task_id`` with ``_CancelledError``; False if it is not waiting."""
        waiter = self._waiters.pop(task_id, None)
        if waiter is None or waiter.done():
            return False
        waiter.set_exception(_CancelledError())
        return True


Outcome = tuple[list[OutputFile], tuple[str, ...]]


class _Runner:
    """Where processors run: one task at a time per slot."""

    async def run(self, slot: int, task: LocalTask, processor: Processor) -> Outcome:
        """Run ``task`` in ``slot``: its probed outputs and their SHA-256 digests.

        Raises:
            _CancelledError: the task was cancelled.
            ProcessorError: the processor refused or failed.
        """
        raise NotImplementedError

    def cancel(self, task: LocalTask) -> None:
        """Ask the running ``task`` to stop (its ``cancel_flag`` is set already)."""

    async def aclose(self) -> None:
        """Stop every worker."""


class _Threads(_Runner):
    """Processors in a thread pool of this process, reading inputs as they go."""

    def __init__(
        self, workers: int, resolve: Callable[[str], bytes], max_input_pixels: int
    ) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compute")
        self._resolve = resolve
        self._max_input_pixels = max_input_pixels
        # What processors keep between tasks. The pool's threads share it: a processor
        # that keeps something must guard it (the diffusion provider locks its models).
        self._keep: dict[str, Any] = {}

    async def run(self, slot: int, task: LocalTask, processor: Processor) -> Outcome:
        loop = asyncio.get_running_loop()

        def report(value: float) -> None:
            if task.cancel_flag.is_set():
                raise _CancelledError
            clamped = min(max(value, 0.0), 1.0)
            with contextlib.suppress(RuntimeError):  # the loop closed under a dying worker
                loop.call_soon_threadsafe(lambda: task.update(progress=clamped))

        context = ProcessorContext(
            resolve=self._resolve,
            progress=report,
            max_input_pixels=self._max_input_pixels,
            keep=self._keep,
        )

        def work() -> Outcome:
            # In the worker thread: PENDING until a worker actually picks the task up.
            if task.cancel_flag.is_set():
                raise _CancelledError
            loop.call_soon_threadsafe(lambda: task.update(status=TaskStatus.RUNNING))
            return _finished(processor(task.request.params, context))

        return await loop.run_in_executor(self._executor, work)

    async def aclose(self) -> None:
        # Off the loop: a worker may be waiting on the loop for an input (a storage read).
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)


class _Processes(_Runner):
    """Processors in worker processes, one per slot (see the module docstring)."""

    def __init__(
        self,
        workers: int,
        resolve: Callable[[str], bytes],
        max_input_pixels: int,
        priority: _Priority,
    ) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * workers
        self._starting: set[asyncio.Task[_Worker]] = set()
        self._resolve = resolve
        self._max_input_pixels = max_input_pixels
        self._priority = priority
        self._seq = 0
        self._running: dict[str, tuple[_Worker, int]] = {}  # task id -> its worker, its seq

    async def run(self, slot: int, task: LocalTask, processor: Processor) -> Outcome:
        worker = self._workers[slot]
        if worker is not None and not worker.alive():  # died between tasks
            self._workers[slot] = None
            await worker.stop()
            worker = None
        if worker is None:
            # Shielded: a start cut short would leave a process nobody stops (aclose waits
            # for the starts still under way, then stops every worker they recorded).
            starting = asyncio.create_task(self._start(slot))
            self._starting.add(starting)
            starting.add_done_callback(self._starting.discard)
            worker = await asyncio.shield(starting)
        params = task.request.params
        inputs = await asyncio.to_thread(_read_inputs, params, self._resolve)
        if task.cancel_flag.is_set():
            raise _CancelledError
        self._seq += 1
        seq = self._seq
        self._running[task.id] = (worker, seq)
        try:
            return await self._exchange(worker, seq, task, processor, inputs)
        except _WorkerDiedError:
            self._workers[slot] = None  # a fresh worker for the slot's next task
            await worker.stop()  # reaped: its exit status is known
            raise ProcessorError(
                "internal", f"the worker process died ({worker.exit_status()})"
            ) from None
        except asyncio.CancelledError:
            # Abandoned (aclose): the worker may be mid-task, so it is not used again.
            self._workers[slot] = None
            await asyncio.shield(worker.stop())
            raise
        finally:
            del self._running[task.id]

    async def _start(self, slot: int) -> _Worker:
        worker = await _Worker.start(self._context, slot, self._priority)
        self._workers[slot] = worker
        return worker

    async def _exchange(
        self,
        worker: _Worker,
        seq: int,
        task: LocalTask,
        processor: Processor,
        inputs: dict[str, bytes | Exception],
    ) -> Outcome:
        await worker.send(
            ("run", seq, processor, task.request.params, inputs, self._max_input_pixels)
        )
        while True:
            message = await worker.receive()
            kind = message[0]
            if kind == "running":
                task.update(status=TaskStatus.RUNNING)
            elif kind == "progress":
                task.update(progress=message[1])
            elif kind == "done":
                return message[1], message[2]
            elif kind == "failed":
                raise ProcessorError(message[1], message[2])
            elif kind == "cancelled":
                raise _CancelledError
            else:
                log.error("processor for %s failed:\n%s", task.request.task_type, message[1])
                raise ProcessorError("internal", "processor failed unexpectedly")

    def cancel(self, task: LocalTask) -> None:
        running = self._running.get(task.id)
        if running is not None:
            worker, seq = running
            worker.send_nowait(("cancel", seq))

    async def aclose(self) -> None:
        await asyncio.gather(*self._starting, return_exceptions=True)
        workers = [w for w in self._workers if w is not None]
        self._workers = [None] * len(self._workers)
        await asyncio.gather(*(w.stop() for w in workers))


class _WorkerDiedError(Exception):
    """The worker process's end of the stream closed (it exited or was killed)."""


class _Worker:
    """One worker process and the parent's end of its socket pair."""

    def __init__(
        self,
        process: BaseProcess,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.process = process
        self._reader = reader
        self._writer = writer
        self._stopping: asyncio.Task[None] | None = None
        self._exitcode: int | None = None

    @classmethod
    async def start(cls, context: SpawnContext, slot: int, priority: _Priority) -> _Worker:
        """Spawn a worker process (off the loop: it forks and execs an interpreter)."""
        ours, theirs = socket.socketpair()
        try:
            process = context.Process(
                target=_worker_main,
                args=(theirs, priority),
                name=f"compute-{slot}",
                daemon=True,
            )
            await asyncio.to_thread(process.start)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the worker has its own copy now; ours would hide its exit
        try:
            reader, writer = await asyncio.open_connection(sock=ours)
        except BaseException:
            ours.close()  # the worker reads the end of its stream and exits
            await asyncio.to_thread(_end, process)
            raise
        return cls(process, reader, writer)

    def alive(self) -> bool:
        """Whether the process still runs (a dead one is reaped by asking)."""
        return self.process.is_alive()

    async def send(self, message: tuple[Any, ...]) -> None:
        """Write one message and wait until the stream has taken it."""
        self.send_nowait(message)
        try:
            await self._writer.drain()
        except ConnectionError as exc:
            raise _WorkerDiedError from exc

    def send_nowait(self, message: tuple[Any, ...]) -> None:
        """Queue one message on the stream (a dead worker's reads will say so)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > 0x7FFFFFFF:
            header = _HEADER.pack(-1) + _LONG_HEADER.pack(len(data))
        else:
            header = _HEADER.pack(len(data))
        if not self._writer.is_closing():
            self._writer.write(header + data)

    async def receive(self) -> tuple[Any, ...]:
        """The worker's next message.

        Raises:
            _WorkerDiedError: the stream ended (the worker is gone).
        """
        try:
            (size,) = _HEADER.unpack(await self._reader.readexactly(_HEADER.size))
            if size == -1:
                (size,) = _LONG_HEADER.unpack(await self._reader.readexactly(_LONG_HEADER.size))
            data = await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise _WorkerDiedError from exc
        message: tuple[Any, ...] = pickle.loads(data)
        return message

    def exit_status(self) -> str:
        """How the process ended, once ``stop`` has reaped it."""
        code = self._exitcode
        if code is None:
            return "still running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"

    async def stop(self) -> None:
        """Close the stream, give the process ``STOP_GRACE_S`` to exit, then end it; reap it."""
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop())
        await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        self._exitcode = await asyncio.to_thread(_end, self.process)


def _end(process: BaseProcess) -> int | None:
    """Its exit code, once it exited (terminated, then killed if it does not) and is reaped."""
    process.join(STOP_GRACE_S)
    if process.exitcode is None:
        process.terminate()
        process.join(STOP_GRACE_S)
    if process.exitcode is None:
        process.kill()
        process.join()
    code = process.exitcode
    process.close()
    return code


def _read_inputs(
    params: dict[str, Any], resolve: Callable[[str], bytes]
) -> dict[str, bytes | Exception]:
    """What ``resolve`` answers for every string in ``params``; in a thread, off the loop.

    The keys are the parameters' own string objects, so pickling the task with its
    inputs does not copy a long reference (a data: URI) twice.
    """
    answers: dict[str, bytes | Exception] = {}

    def visit(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, list):
            for item in value:
                visit(item)
        elif isinstance(value, str) and value not in answers:
            try:
                answers[value] = resolve(value)
            except FileNotFoundError as exc:
                answers[value] = FileNotFoundError(str(exc))
            except Exception as exc:
                answers[value] = _InputError(f"{value[:80]!r} could not be read: {exc!r}")

    visit(params)
    return answers


def _finished(outputs: list[OutputFile]) -> Outcome:
    """The processor's outputs probed, and their SHA-256 digests; in the worker."""
    checked = verified(outputs)
    return checked, tuple(hashlib.sha256(o.data).hexdigest() for o in checked)


# -- in the worker process ---------------------------------------------------------------


class _Channel:
    """The worker's end of the stream, and what its current task's context needs from it."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.seq = 0
        self._cancelled = False
        self._last_progress = -math.inf

    def begin(self, seq: int) -> None:
        self.seq = seq
        self._cancelled = False
        self._last_progress = -math.inf

    def check_cancelled(self) -> None:
        """Raise ``_CancelledError`` if a cancel for this task came (or the parent left)."""
        while not self._cancelled and self._conn.poll():
            try:
                message = self._conn.recv()
            except EOFError:
                self._cancelled = True  # the parent closed the stream: stop
                break
            if message == ("cancel", self.seq):
                self._cancelled = True
        if self._cancelled:
            raise _CancelledError

    def send(self, message: tuple[Any, ...]) -> None:
        """Write one message to the parent; stop the task if the parent is gone."""
        try:
            self._conn.send(message)
        except OSError:
            self._cancelled = True
            raise _CancelledError from None

    def progress(self, value: float) -> None:
        """``ctx.progress``: stop if cancelled, else report (at most every interval)."""
        self.check_cancelled()
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_INTERVAL_S:
            self._last_progress = now
            self.send(("progress", min(max(value, 0.0), 1.0)))


@dataclass(frozen=True)
class _Priority:
    """How far below the server a worker process runs."""

    nice: int  # added to the process's niceness
    idle: bool  # SCHED_IDLE as well, where the system has it

    def lower(self) -> None:
        """Lower the calling process's priority; a policy the system refuses is skipped."""
        if self.nice:
            os.nice(self.nice)
        policy = getattr(os, "SCHED_IDLE", None)
        if self.idle and policy is not None:
            try:
                os.sched_setscheduler(0, policy, os.sched_param(0))
            except OSError:  # a sandbox that forbids it: the niceness alone
                log.warning("SCHED_IDLE was refused; the compute worker runs niced only")


def _worker_main(sock: socket.socket, priority: _Priority) -> None:
    """A worker process: run tasks as the parent sends them, until its stream ends."""
    # Ctrl-C reaches the whole process group: the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    priority.lower()
    keep: dict[str, Any] = {}  # what processors keep between this process's tasks
    conn = Connection(sock.detach())
    channel = _Channel(conn)
    with contextlib.suppress(EOFError, OSError):  # the parent closed the stream, or left
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                raise
            except Exception:
                # A task that does not unpickle here (a processor this process cannot import).
                conn.send(("error", traceback.format_exc()))
                continue
            if message[0] != "run":
                continue  # a cancel that came after its task had ended
            _, seq, processor, params, inputs, max_input_pixels = message
            channel.begin(seq)
            conn.send(_execute(channel, processor, params, inputs, max_input_pixels, keep))


def _execute(
    channel: _Channel,
    processor: Processor,
    params: dict[str, Any],
    inputs: dict[str, bytes | Exception],
    max_input_pixels: int,
    keep: dict[str, Any],
) -> tuple[Any, ...]:
    """Run one task in the worker; the message that ends it."""

    def resolve(uri: str) -> bytes:
        found = inputs.get(uri)
        if found is None:
            raise FileNotFoundError(f"cannot resolve {uri!r}")
        if isinstance(found, Exception):
            raise found
        return found

    context = ProcessorContext(
        resolve=resolve, progress=channel.progress, max_input_pixels=max_input_pixels, keep=keep
    )
    try:
        channel.check_cancelled()
        channel.send(("running",))
        outputs, digests = _finished(processor(params, context))
    except _CancelledError:
        return ("cancelled",)
    except ProcessorError as exc:
        return ("failed", exc.category, str(exc))
    except Exception:
        return ("error", traceback.format_exc())
    return ("done", outputs, digests)
