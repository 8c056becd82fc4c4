"""The BASE workflow: one task per prediction, submitted concurrently, results recorded."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from server.compute.base import (
    ComputeBackend,
    ComputeError,
    TaskRequest,
    TaskSnapshot,
    UnknownComputeTaskError,
)
from server.config import OrchestrationSettings
from server.domain.enums import (
    EventKind,
    GenerationStatus,
    PredictionStatus,
    TaskStatus,
    TaskType,
)
from server.domain.model import Code, Recipe, ResourceError
from server.domain.states import GENERATION_TERMINAL, PREDICTION_TERMINAL, TASK_TERMINAL
from server.media.artifacts import FileArtifactStore
from server.store import mapping, repository
from server.store.models import Artifact, Generation, Prediction, Task
from server.store.uow import Store, UnitOfWork

log = logging.getLogger(__name__)

SUBMIT_ATTEMPTS = 5
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 5.0


class BaseWorkflow:
    """Drives a generation's predictions through compute and records every change."""

    def __init__(
        self,
        store: Store,
        compute: ComputeBackend,
        artifacts: FileArtifactStore,
        slots: asyncio.Semaphore,
        *,
        settings: OrchestrationSettings,
    ) -> None:
        self._store = store
        self._compute = compute
        self._artifacts = artifacts
        self._slots = slots
        self._progress_interval = settings.progress_interval
        # Generations whose last result already settled their final status in-line.
        self._settled: set[str] = set()

    async def run(self, generation: Generation) -> None:
        """Run every unfinished prediction, then settle the generation's final status.

        ``generation`` is a snapshot read by the engine; every change is made on a
        fresh copy inside its own transaction. The generation stays PENDING while it
        waits for compute slots; the first accepted submission moves it to PROCESSING
        in the same transaction.
        """
        generation_id = generation.id
        live = [p for p in generation.predictions if p.status not in PREDICTION_TERMINAL]
        try:
            async with asyncio.TaskGroup() as group:
                for prediction in live:
                    task = _current_task(prediction)
                    request = TaskRequest(
                        task_type=TaskType(task.task_type),
                        params=task.params,
                        idempotency_key=task.id,  # a resubmission never starts a second task
                        organization=generation.organization,
                    )
                    group.create_task(self._run_prediction(generation_id, task, request))
            if generation_id not in self._settled:
                await self._settle(generation_id)  # e.g. resumed with every prediction done
        finally:
            self._settled.discard(generation_id)

    async def _run_prediction(self, generation_id: str, task: Task, request: TaskRequest) -> None:
        async with self._slots:
            # A task that reached compute before a restart is re-attached, not resubmitted.
            compute_id = task.compute_task_id
            if compute_id is None:
                compute_id = await self._submit(generation_id, task.id, request)
                if compute_id is None:
                    return
            try:
                await self._follow(generation_id, task.id, compute_id)
            except UnknownComputeTaskError:
                # Compute no longer knows the task (the local backend's tasks die with the
                # process; a remote one may have restarted): run it again as a new attempt.
                log.info("compute lost task %s (%s); submitting it again", task.id, compute_id)
                await self._record_lost(generation_id, task.id, compute_id)
                compute_id = await self._submit(generation_id, task.id, request)
                if compute_id is not None:
                    await self._follow(generation_id, task.id, compute_id)

    async def _record_lost(self, generation_id: str, task_id: str, compute_id: str) -> None:
        """Start the task's next attempt, keeping the lost compute id on the record."""
        async with self._store.write() as uow:
            generation = await _load(uow, generation_id)
            row, _ = _find_task(generation, task_id)
            row.previous_compute_task_ids = [*row.previous_compute_task_ids, compute_id]
            row.compute_task_id = None
            row.attempt += 1
            row.progress = 0.0
            note = (
                f"compute backend {self._compute.name!r} no longer knows task {compute_id} "
                f"(its work was lost, e.g. it restarted); submitting attempt {row.attempt}"
            )
            uow.task_event(generation, row, EventKind.TASK_CHANGED, note=note)

    async def _submit(self, generation_id: str, task_id: str, request: TaskRequest) -> str | None:
        """Submit with capped, jittered backoff on transient errors; None if it failed."""
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            try:
                compute_id = await self._compute.submit(request)
                break
            except ComputeError as exc:
                if not exc.transient or attempt == SUBMIT_ATTEMPTS:
                    error = ResourceError.compute_failed(exc.category, exc.message, "")
                    await self._task_failed(generation_id, task_id, error)
                    return None
                delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # backoff, not a wait
        async with self._store.write() as uow:
            generation = await _load(uow, generation_id)
            row, prediction = _find_task(generation, task_id)
            row.compute_task_id = compute_id
            if generation.status == GenerationStatus.PENDING:
                uow.set_generation_status(generation, GenerationStatus.PROCESSING)
            if row.status == TaskStatus.PENDING:
                uow.set_task_status(generation, row, TaskStatus.RUNNING)
            else:
                uow.task_event(generation, row, EventKind.TASK_CHANGED)
            if prediction.status == PredictionStatus.PENDING:
                uow.set_prediction_status(generation, prediction, PredictionStatus.GENERATING)
        return compute_id

    async def _follow(self, generation_id: str, task_id: str, compute_id: str) -> None:
        last_write = 0.0
        async for snap in self._compute.watch(compute_id):
            if snap.status is TaskStatus.COMPLETED:
                await self._task_completed(generation_id, task_id, snap)
            elif snap.status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
                category = snap.error_category or "internal"
                message = snap.error_message or f"compute reported {snap.status.value.lower()}"
                error = ResourceError.compute_failed(category, message, compute_id)
                await self._task_failed(generation_id, task_id, error)
            elif time.monotonic() - last_write >= self._progress_interval and snap.progress:
                last_write = time.monotonic()
                await self._task_progress(generation_id, task_id, snap.progress)

    async def _task_progress(self, generation_id: str, task_id: str, progress: float) -> None:
        async with self._store.write() as uow:
            generation = await _load(uow, generation_id)
            row, _ = _find_task(generation, task_id)
            if row.status in TASK_TERMINAL or progress <= row.progress:
                return
            row.progress = progress
            uow.task_event(generation, row, EventKind.TASK_PROGRESS)

    async def _task_completed(self, generation_id: str, task_id: str, snap: TaskSnapshot) -> None:
        if not snap.outputs:
            error = ResourceError.compute_failed(
                "internal", "compute returned no output", snap.compute_id
            )
            await self._task_failed(generation_id, task_id, error)
            return
        output = snap.outputs[0]
        blob = await self._artifacts.put(output.data, output.mime_type)
        async with self._store.write() as uow:
            generation = await _load(uow, generation_id)
            row, prediction = _find_task(generation, task_id)
            artifact = await repository.ensure_artifact(
                uow.session,
                blob.sha256,
                lambda: Artifact(
                    sha256=blob.sha256,
                    mime_type=output.mime_type,
                    size_bytes=blob.size_bytes,
                    width=output.width,
                    height=output.height,
                    duration_s=output.duration_s,
                    frame_count=output.frame_count,
                    uri=blob.uri,
                ),
            )
            recipe = _recipe(row, output.seed, self._compute.name)
            prediction.recipe = recipe
            await repository.own_artifact(
                uow.session, generation.organization, artifact.sha256, recipe
            )
            uow.set_task_status(generation, row, TaskStatus.COMPLETED)
            prediction.artifact_sha256 = artifact.sha256
            prediction.artifact = artifact
            uow.set_prediction_status(generation, prediction, PredictionStatus.COMPLETED)
            self._settle_when_done(uow, generation)

    async def _task_failed(self, generation_id: str, task_id: str, error: ResourceError) -> None:
        async with self._store.write() as uow:
            generation = await _load(uow, generation_id)
            row, prediction = _find_task(generation, task_id)
            uow.set_task_status(generation, row, TaskStatus.FAILED, error=error)
            uow.set_prediction_status(generation, prediction, PredictionStatus.ERROR, error=error)
            self._settle_when_done(uow, generation)

    async def _settle(self, generation_id: str) -> None:
        async with self._store.write() as uow:
            self._settle_when_done(uow, await _load(uow, generation_id))

    def _settle_when_done(self, uow: UnitOfWork, generation: Generation) -> None:
        _settle_when_done(uow, generation)
        if GenerationStatus(generation.status) in GENERATION_TERMINAL:
            self._settled.add(generation.id)

    async def finish_cancel(self, generation_id: str) -> None:
        """Release compute, then close everything unfinished as CANCELLED."""
        await self._close(
            generation_id,
            prediction_status=PredictionStatus.CANCELLED,
            generation_status=GenerationStatus.CANCELLED,
            error=ResourceError.cancelled(),
        )

    async def expire(self, generation_id: str) -> None:
        """Release compute, then fail the generation with DEADLINE_EXCEEDED."""
        await self._close(
            generation_id,
            prediction_status=PredictionStatus.ERROR,
            generation_status=GenerationStatus.FAILED,
            error=ResourceError.deadline_exceeded(),
        )

    async def fail(self, generation_id: str, error: ResourceError) -> None:
        """Release compute, then fail the generation with ``error``."""
        await self._close(
            generation_id,
            prediction_status=PredictionStatus.ERROR,
            generation_status=GenerationStatus.FAILED,
            error=error,
        )

    async def _close(
        self,
        generation_id: str,
        *,
        prediction_status: PredictionStatus,
        generation_status: GenerationStatus,
        error: ResourceError,
    ) -> None:
        async with self._store.read() as session:
            generation = await session.get(Generation, generation_id)
            if generation is None or GenerationStatus(generation.status) in GENERATION_TERMINAL:
                return
            live = [
                t.compute_task_id
                for p in generation.predictions
                for t in p.tasks
                if t.status not in TASK_TERMINAL and t.compute_task_id
            ]
        notes = await asyncio.gather(*(self._release(cid) for cid in live))
        released = dict(zip(live, notes, strict=True))
        async with self._store.write() as uow:
            generation = await _load(uow, generation_id)
            current = GenerationStatus(generation.status)
            if current in GENERATION_TERMINAL:
                return
            if current is GenerationStatus.CANCELLING:
                # A requested cancel is honoured whatever else ended the workflow.
                prediction_status, generation_status, error = (
                    PredictionStatus.CANCELLED,
                    GenerationStatus.CANCELLED,
                    ResourceError.cancelled(),
                )
            for prediction in generation.predictions:
                for task in prediction.tasks:
                    if task.status not in TASK_TERMINAL:
                        note = released.get(task.compute_task_id or "", "never reached compute")
                        uow.set_task_status(
                            generation,
                            task,
                            TaskStatus.CANCELLED,
                            error=ResourceError.cancelled(note),
                        )
                if prediction.status not in PREDICTION_TERMINAL:
                    uow.set_prediction_status(
                        generation, prediction, prediction_status, error=error
                    )
            uow.set_generation_status(generation, generation_status, error=error)

    async def _release(self, compute_id: str) -> str:
        try:
            confirmed = await self._compute.cancel(compute_id)
        except ComputeError as exc:
            return f"compute did not confirm release: {exc.message}"
        return "compute confirmed release" if confirmed else "compute did not confirm release"


async def _load(uow: UnitOfWork, generation_id: str) -> Generation:
    generation = await repository.lock_generation(uow.session, generation_id)
    if generation is None:
        raise LookupError(f"generation {generation_id} vanished")
    return generation


def _settle_when_done(uow: UnitOfWork, generation: Generation) -> None:
    """Give the generation its final status once every prediction is terminal."""
    status = GenerationStatus(generation.status)
    if status in GENERATION_TERMINAL:
        return
    if any(p.status not in PREDICTION_TERMINAL for p in generation.predictions):
        return
    if status is GenerationStatus.CANCELLING:
        # Cancelled while the last results came in: the cancel wins.
        uow.set_generation_status(
            generation, GenerationStatus.CANCELLED, error=ResourceError.cancelled()
        )
        return
    done = [p for p in generation.predictions if p.status == PredictionStatus.COMPLETED]
    if len(done) == len(generation.predictions):
        uow.set_generation_status(generation, GenerationStatus.COMPLETED)
    elif done:
        uow.set_generation_status(generation, GenerationStatus.PARTIALLY_COMPLETED)
    else:
        uow.set_generation_status(
            generation, GenerationStatus.FAILED, error=_none_completed(generation)
        )


def _none_completed(generation: Generation) -> ResourceError:
    """The generation's error when no prediction completed: the first failure's code."""
    failed = next((p for p in generation.predictions if p.error), None)
    if failed is None or failed.error is None:
        return ResourceError(Code.ABORTED, "NO_PREDICTION_COMPLETED", "no prediction completed")
    first = mapping.error(failed.error)
    code = first.code if first is not None else Code.ABORTED
    message = first.message if first is not None else "no prediction completed"
    return ResourceError(code, "NO_PREDICTION_COMPLETED", message, {"prediction_id": failed.id})


def _current_task(prediction: Prediction) -> Task:
    return prediction.tasks[-1]


def _find_task(generation: Generation, task_id: str) -> tuple[Task, Prediction]:
    for prediction in generation.predictions:
        for task in prediction.tasks:
            if task.id == task_id:
                return task, prediction
    raise LookupError(f"task {task_id} is not part of generation {generation.id}")


def _recipe(task: Task, seed: int, backend: str) -> dict[str, Any]:
    recipe = Recipe(
        task_type=TaskType(task.task_type),
        parameters=task.params,
        seed=int(task.params.get("seed", seed)),
        backend=backend,
        input_sha256=_input_hashes(task.params),
    )
    return mapping.stored_recipe(recipe)


def _input_hashes(params: dict[str, Any]) -> list[str]:
    """The sha256 of every ``artifact:`` input the parameters name, in order."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str) and value.startswith("artifact:"):
            found.append(value.removeprefix("artifact:"))
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(params)
    return found
