"""The local backend's worker processes, through its public surface.

Progress crosses from the worker, a cancel reaches it between steps and frees the slot, a
worker killed with SIGKILL fails its task as internal and the slot's next task runs in a
fresh one, ``aclose`` leaves no process behind, and outputs are the same bytes for a seed
whichever process renders them. The processors are in ``worker_processors`` (a worker
imports them by name); they tell the test their process id through a file.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import slow_import_processors as slow_import
import worker_processors as procs
from helpers import assert_eventually
from PIL import Image

from server.compute.base import TaskRequest, TaskSnapshot
from server.compute.local import STOP_GRACE_S, LocalComputeBackend
from server.compute.processors.tasks import default_registry
from server.compute.registry import Processor, ProcessorRegistry
from server.domain.enums import TaskStatus, TaskType
from server.domain.states import TASK_TERMINAL

WAIT_S = 30.0


def _no_inputs(uri: str) -> bytes:
    raise FileNotFoundError(f"cannot resolve {uri!r}")


def _backend(
    processor: Processor | None = None,
    *,
    workers: int = 1,
    resolve: Callable[[str], bytes] = _no_inputs,
    **options: Any,
) -> LocalComputeBackend:
    """A backend with the default isolation (worker processes)."""
    registry = (
        default_registry()
        if processor is None
        else ProcessorRegistry({TaskType.GENERATION: processor})
    )
    return LocalComputeBackend(
        registry, resolve=resolve, workers=workers, max_input_pixels=10**7, **options
    )


class Files:
    """The files one task's processor and the test share."""

    def __init__(self, root: Path, name: str) -> None:
        self.pid_file = root / f"{name}.pid"
        self.release = root / f"{name}.release"

    def params(self, **extra: Any) -> dict[str, Any]:
        return {"pid_file": str(self.pid_file), "release": str(self.release), **extra}

    async def pid(self) -> int:
        """The id of the process that ran (or runs) the task, once it has started."""

        async def written() -> bool:
            return self.pid_file.exists()

        await assert_eventually(written, timeout=WAIT_S)
        return int(self.pid_file.read_text())


def _request(key: str, params: dict[str, Any]) -> TaskRequest:
    return TaskRequest(TaskType.GENERATION, params, key, "org")


async def _until(
    backend: LocalComputeBackend, compute_id: str, wanted: Callable[[TaskSnapshot], bool]
) -> TaskSnapshot:
    """The first snapshot of the task that ``wanted`` accepts."""

    async def first() -> TaskSnapshot:
        async for snap in backend.watch(compute_id):
            if wanted(snap):
                return snap
        raise AssertionError(f"{compute_id} ended without the snapshot wanted")

    return await asyncio.wait_for(first(), WAIT_S)


async def _last(backend: LocalComputeBackend, compute_id: str) -> TaskSnapshot:
    return await _until(backend, compute_id, lambda snap: snap.status in TASK_TERMINAL)


async def _statuses(backend: LocalComputeBackend, compute_id: str) -> list[TaskStatus]:
    """Every status the task's snapshots show, in order, until it ends."""
    seen: list[TaskStatus] = []
    async for snap in backend.watch(compute_id):
        if not seen or seen[-1] is not snap.status:
            seen.append(snap.status)
    return seen


def _zombie(pid: int) -> bool:
    """The process has exited and waits for its parent to reap it.

    Its main thread shows as a zombie before its other threads are gone too; only then
    can it be reaped.
    """
    proc = Path(f"/proc/{pid}")
    threads = [task.name for task in (proc / "task").iterdir()]
    return threads == [str(pid)] and (proc / "stat").read_text().split(") ")[1].startswith("Z")


def _gone(pid: int) -> bool:
    """The process has exited and been reaped (no zombie left)."""
    return not Path(f"/proc/{pid}").exists()


async def test_progress_crosses_from_the_worker_process_while_it_runs(tmp_path: Path) -> None:
    files = Files(tmp_path, "a")
    backend = _backend(procs.stepped)
    try:
        compute_id = await backend.submit(_request("p1", files.params()))
        running = await _until(backend, compute_id, lambda s: s.progress == 0.5)
        assert running.status is TaskStatus.RUNNING
        assert await files.pid() != os.getpid()  # not this process
        files.release.touch()
        last = await _last(backend, compute_id)
        assert (last.status, last.progress) == (TaskStatus.COMPLETED, 1.0)
        (output,) = last.outputs
        assert (output.mime_type, output.width, output.height) == ("image/png", 4, 4)
        assert backend.cell(compute_id).digests == (hashlib.sha256(output.data).hexdigest(),)
    finally:
        await backend.aclose()


@pytest.mark.parametrize("idle", [True, False])
async def test_workers_run_below_the_server_niced_and_idle_scheduled_when_asked(
    tmp_path: Path, idle: bool
) -> None:
    files = Files(tmp_path, "a")
    backend = _backend(procs.quick, nice=7, idle=idle)
    try:
        compute_id = await backend.submit(_request("n1", files.params()))
        assert (await _last(backend, compute_id)).status is TaskStatus.COMPLETED
        pid = await files.pid()
        assert pid != os.getpid()
        niceness = os.getpriority(os.PRIO_PROCESS, pid) - os.getpriority(os.PRIO_PROCESS, 0)
        assert niceness == 7
        expected = os.SCHED_IDLE if idle else os.sched_getscheduler(0)
        assert os.sched_getscheduler(pid) == expected
    finally:
        await backend.aclose()


async def test_cancel_stops_the_processor_between_steps_and_frees_the_slot(
    tmp_path: Path,
) -> None:
    first, second = Files(tmp_path, "a"), Files(tmp_path, "b")
    backend = _backend(procs.stepped, workers=1)
    try:
        compute_id = await backend.submit(_request("c1", first.params()))
        await _until(backend, compute_id, lambda s: s.progress == 0.5)
        assert await asyncio.wait_for(backend.cancel(compute_id), WAIT_S)
        assert (await _last(backend, compute_id)).status is TaskStatus.CANCELLED
        assert backend.load == (0, 0)
        # The one slot runs the next task, in the same process: the cancel stopped the
        # processor (it was never released), not its worker.
        second.release.touch()
        following = await backend.submit(_request("c2", second.params()))
        assert (await _last(backend, following)).status is TaskStatus.COMPLETED
        assert await second.pid() == await first.pid()
    finally:
        await backend.aclose()


async def test_a_queued_task_is_pending_and_cancels_at_once_without_running(
    tmp_path: Path,
) -> None:
    first, queued_files = Files(tmp_path, "a"), Files(tmp_path, "b")
    backend = _backend(procs.stepped, workers=1)
    try:
        running = await backend.submit(_request("q1", first.params()))
        await _until(backend, running, lambda s: s.status is TaskStatus.RUNNING)
        queued = await backend.submit(_request("q2", queued_files.params()))
        statuses = asyncio.create_task(_statuses(backend, queued))
        # The next progress report of the running task: the queued one's turn on the loop
        # (scheduled at its submit) has come and gone, and it waits for the worker.
        reports = aiter(backend.watch(running))
        await anext(reports)
        await asyncio.wait_for(anext(reports), WAIT_S)
        assert backend.cell(queued).status is TaskStatus.PENDING
        assert backend.load == (1, 1)
        # Cancelled while the only worker is still busy: it ends without waiting for it.
        assert await asyncio.wait_for(backend.cancel(queued), WAIT_S)
        assert await statuses == [TaskStatus.PENDING, TaskStatus.CANCELLED]
        assert backend.cell(running).status is TaskStatus.RUNNING
        first.release.touch()
        assert (await _last(backend, running)).status is TaskStatus.COMPLETED
        assert not queued_files.pid_file.exists()  # it never ran
    finally:
        await backend.aclose()


async def test_a_task_cancelled_before_its_worker_starts_it_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker, files = tmp_path / "importing", Files(tmp_path, "a")
    monkeypatch.setenv("SARTIQ_TEST_IMPORT_MARKER", str(marker))
    backend = _backend(slow_import.stepped, workers=1)
    try:
        compute_id = await backend.submit(_request("e1", files.params()))
        statuses = asyncio.create_task(_statuses(backend, compute_id))

        async def sent() -> bool:  # the worker is unpickling the task (importing)
            return marker.exists()

        await assert_eventually(sent, timeout=WAIT_S)
        assert await asyncio.wait_for(backend.cancel(compute_id), WAIT_S)
        assert await statuses == [TaskStatus.PENDING, TaskStatus.CANCELLED]
        assert not files.pid_file.exists()  # the processor never started
    finally:
        await backend.aclose()


async def test_a_killed_worker_fails_its_task_as_internal_and_the_next_task_runs(
    tmp_path: Path,
) -> None:
    victim, after = Files(tmp_path, "a"), Files(tmp_path, "b")
    backend = _backend(procs.stepped, workers=1)
    try:
        compute_id = await backend.submit(_request("k1", victim.params()))
        await _until(backend, compute_id, lambda s: s.status is TaskStatus.RUNNING)
        pid = await victim.pid()
        os.kill(pid, signal.SIGKILL)
        last = await _last(backend, compute_id)
        assert (last.status, last.error_category) == (TaskStatus.FAILED, "internal")
        assert "the worker process died (killed by SIGKILL)" in (last.error_message or "")

        async def reaped() -> bool:
            return _gone(pid)

        await assert_eventually(reaped, timeout=WAIT_S)
        after.release.touch()
        following = await backend.submit(_request("k2", after.params()))
        assert (await _last(backend, following)).status is TaskStatus.COMPLETED
        assert await after.pid() not in (pid, os.getpid())  # a fresh worker
    finally:
        await backend.aclose()


async def test_a_worker_killed_between_tasks_is_replaced_before_the_next(tmp_path: Path) -> None:
    first, second = Files(tmp_path, "a"), Files(tmp_path, "b")
    backend = _backend(procs.quick, workers=1)
    try:
        done = await backend.submit(_request("b1", first.params()))
        assert (await _last(backend, done)).status is TaskStatus.COMPLETED
        pid = await first.pid()
        os.kill(pid, signal.SIGKILL)

        async def dead() -> bool:
            return _zombie(pid)

        await assert_eventually(dead, timeout=WAIT_S)
        following = await backend.submit(_request("b2", second.params()))
        assert (await _last(backend, following)).status is TaskStatus.COMPLETED
        assert await second.pid() != pid
        assert _gone(pid)
    finally:
        await backend.aclose()


async def test_aclose_leaves_no_worker_process_even_one_that_ignores_cancel(
    tmp_path: Path,
) -> None:
    polite, stubborn = Files(tmp_path, "a"), Files(tmp_path, "b")
    registry = ProcessorRegistry(
        {TaskType.GENERATION: procs.stepped, TaskType.EDITING: procs.stubborn}
    )
    backend = LocalComputeBackend(registry, resolve=_no_inputs, workers=2, max_input_pixels=10**7)
    a = await backend.submit(_request("s1", polite.params()))
    b = await backend.submit(TaskRequest(TaskType.EDITING, stubborn.params(), "s2", "org"))
    for compute_id in (a, b):
        await _until(backend, compute_id, lambda s: s.status is TaskStatus.RUNNING)
    pids = [await polite.pid(), await stubborn.pid()]
    started = time.monotonic()
    await asyncio.wait_for(backend.aclose(), WAIT_S)
    # The stubborn one is terminated after the grace; nothing waits longer than that.
    assert time.monotonic() - started < 2 * STOP_GRACE_S + 5
    assert all(_gone(pid) for pid in pids)
    assert multiprocessing.active_children() == []


async def test_aclose_stops_idle_workers(tmp_path: Path) -> None:
    files = Files(tmp_path, "a")
    backend = _backend(procs.quick, workers=2)
    compute_id = await backend.submit(_request("i1", files.params()))
    assert (await _last(backend, compute_id)).status is TaskStatus.COMPLETED
    pid = await files.pid()
    await asyncio.wait_for(backend.aclose(), WAIT_S)
    assert _gone(pid)
    assert multiprocessing.active_children() == []


async def test_workers_are_fresh_interpreters_not_forks() -> None:
    import tabnanny  # noqa: F401 (in this process only: a fork would inherit it)

    registry = ProcessorRegistry({TaskType.GENERATION: procs.modules})
    backend = LocalComputeBackend(registry, resolve=_no_inputs, workers=1, max_input_pixels=10**7)
    try:
        params = {"modules": ["tabnanny", "worker_processors"]}
        last = await _last(backend, await backend.submit(_request("m1", params)))
        assert last.outputs[0].notes == ("worker_processors",)
    finally:
        await backend.aclose()


async def test_a_closed_backend_that_never_ran_a_task_started_no_process() -> None:
    backend = _backend()
    await backend.aclose()
    assert multiprocessing.active_children() == []


def _generation(seed: int) -> dict[str, Any]:
    return {
        "width": 64,
        "height": 48,
        "seed": seed,
        "steps": 4,
        "prompt": "a red dress",
        "shot_type": "full-body",
        "subject": None,
        "product": None,
        "style": None,
    }


async def _render(seed: int, **options: Any) -> bytes:
    """One GENERATION rendered by a backend of its own (a fresh worker process)."""
    backend = _backend(**options)
    try:
        last = await _last(backend, await backend.submit(_request("d", _generation(seed))))
        assert last.status is TaskStatus.COMPLETED
        return last.outputs[0].data
    finally:
        await backend.aclose()


async def test_outputs_are_the_same_bytes_for_a_seed_in_any_process() -> None:
    first = await _render(1)
    assert await _render(1) == first  # another worker process
    assert await _render(1, isolation="thread") == first  # and this process
    assert await _render(2) != first
    assert Image.open(io.BytesIO(first)).size == (64, 48)


async def test_outputs_are_probed_in_the_worker_before_the_task_completes() -> None:
    registry = ProcessorRegistry(
        {TaskType.GENERATION: procs.mislabelled, TaskType.EDITING: procs.undecodable}
    )
    backend = LocalComputeBackend(registry, resolve=_no_inputs, workers=1, max_input_pixels=10**7)
    try:
        last = await _last(backend, await backend.submit(_request("o1", {})))
        assert last.status is TaskStatus.COMPLETED
        (output,) = last.outputs
        assert (output.mime_type, output.width, output.height) == ("image/png", 64, 48)
        assert (output.seed, output.notes) == (7, ("n",))
        request = TaskRequest(TaskType.EDITING, {}, "o2", "org")
        broken = await _last(backend, await backend.submit(request))
        assert (broken.status, broken.error_category) == (TaskStatus.FAILED, "internal")
        assert "does not decode" in (broken.error_message or "")
        assert not broken.outputs
    finally:
        await backend.aclose()


@pytest.mark.parametrize(
    ("processor", "category", "message"),
    [
        (procs.refusing, "validation", "width must be positive"),
        (procs.crashing, "internal", "processor failed unexpectedly"),
        # Not importable in a worker (a process needs the processor by name).
        (lambda params, ctx: [], "internal", "processor failed unexpectedly"),
    ],
)
async def test_a_failing_processor_fails_its_task_and_the_worker_goes_on(
    tmp_path: Path, processor: Processor, category: str, message: str
) -> None:
    registry = ProcessorRegistry({TaskType.GENERATION: processor, TaskType.EDITING: procs.quick})
    backend = LocalComputeBackend(registry, resolve=_no_inputs, workers=1, max_input_pixels=10**7)
    files = Files(tmp_path, "after")
    try:
        last = await _last(backend, await backend.submit(_request("f1", {})))
        assert (last.status, last.error_category) == (TaskStatus.FAILED, category)
        assert message in (last.error_message or "")
        request = TaskRequest(TaskType.EDITING, files.params(), "f2", "org")
        assert (await _last(backend, await backend.submit(request))).status is (
            TaskStatus.COMPLETED
        )
    finally:
        await backend.aclose()


async def test_inputs_are_read_by_this_process_off_the_loop_for_the_worker() -> None:
    stored = procs.png((200, 0, 0))
    readers: list[str] = []

    def resolve(uri: str) -> bytes:
        readers.append(threading.current_thread().name)
        if uri == "artifact:present":
            return stored
        if uri == "artifact:broken":
            raise OSError("the disk said no")
        raise FileNotFoundError(f"cannot resolve {uri!r}")

    backend = _backend(procs.echo_input, resolve=resolve)
    try:
        found = await _last(
            backend, await backend.submit(_request("i1", {"image": "artifact:present"}))
        )
        assert found.status is TaskStatus.COMPLETED
        assert found.outputs[0].data == stored
        assert readers
        assert threading.main_thread().name not in readers
        missing = await _last(
            backend, await backend.submit(_request("i2", {"image": "artifact:gone"}))
        )
        assert (missing.status, missing.error_category) == (TaskStatus.FAILED, "validation")
        assert "image missing: cannot resolve 'artifact:gone'" in (missing.error_message or "")
        broken = await _last(
            backend, await backend.submit(_request("i3", {"image": "artifact:broken"}))
        )
        assert (broken.status, broken.error_category) == (TaskStatus.FAILED, "internal")
    finally:
        await backend.aclose()
