"""Running one compute task of a live generation: submit or re-attach, follow, record.

Shared by every workflow. The stop token is checked between units of work and raced
against every wait on compute; a submit is never interrupted, and its compute id is
recorded the moment it returns, so a stopped workflow always knows what to release. A
submit given up on (its answers lost or unreadable past the retry budget) may still have
created a task: it is looked up by its idempotency key and released before the task is
recorded as failed. Following a task retries transient failures within the retry budget,
which starts afresh whenever a snapshot arrives, so a long task is not failed by faults
spread over its whole run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from server.compute.base import (
    ComputeBackend,
    ComputeError,
    TaskRequest,
    TaskSnapshot,
    UnknownComputeTaskError,
)
from server.compute.outputs import expected_kind, kind_of
from server.compute.retry import Backoff, RetryPolicy
from server.config import OrchestrationSettings
from server.domain.enums import (
    ComputeErrorCategory,
    EventKind,
    GenerationStatus,
    PredictionStatus,
    TaskStatus,
)
from server.domain.model import Artifact, ComputeTask, Prediction, Recipe, ResourceError
from server.domain.recorder import utcnow
from server.media.storage import ArtifactStorage, StorageError
from server.orchestration.closing import release, release_policy
from server.orchestration.inputs import InputPreparer, input_hashes
from server.orchestration.live import LiveGeneration
from server.store import repository
from server.store.sessions import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """How a task ended: its output, or why it failed."""

    artifact: Artifact | None = None
    error: ResourceError | None = None


class TaskRunner:
    """Drives compute tasks; one per engine, shared by its workflows."""

    def __init__(
        self,
        compute: ComputeBackend,
        files: ArtifactStorage,
        inputs: InputPreparer,
        slots: asyncio.Semaphore,
        *,
        settings: OrchestrationSettings,
        retry: RetryPolicy,
        store: Store,
    ) -> None:
        self._store = store
        self._compute = compute
        self._retry = retry
        self._release_retry = release_policy(retry)
        self._files = files
        self._inputs = inputs
        self._slots = slots
        self._progress_interval = settings.progress_interval

    async def run(
        self, live: LiveGeneration, prediction: Prediction, task: ComputeTask
    ) -> TaskOutcome:
        """Run ``task`` to its end within a compute slot.

        Raises:
            Stopped: the generation was cancelled or expired at a check point.
        """
        await live.token.race(self._slots.acquire())
        try:
            return await self._run(live, prediction, task)
        finally:
            self._slots.release()

    async def _run(
        self, live: LiveGeneration, prediction: Prediction, task: ComputeTask
    ) -> TaskOutcome:
        live.token.check()
        compute_id: str | ResourceError = task.compute_task_id or await self._earlier(live, task)
        if not compute_id:
            unavailable = await self._inputs.prepare(live, task)
            if unavailable is not None:
                return self._failed(live, prediction, task, unavailable)
            compute_id = await self._submit(live, task)
        if isinstance(compute_id, ResourceError):
            return self._failed(live, prediction, task, compute_id)
        self._attached(live, prediction, task, compute_id)
        resubmitted = False
        backoff = Backoff(self._retry)
        while True:
            try:
                return await self._retry.call(
                    lambda: self._follow(live, prediction, task, backoff),
                    sleep=live.token.sleep,
                    backoff=backoff,
                )
            except UnknownComputeTaskError:
                # Compute no longer knows the task (the local backend's work dies with the
                # process; a remote one may have restarted): run it again, once per run,
                # as the task's next attempt under the same idempotency key.
                if resubmitted:
                    error = ResourceError.compute_failed(
                        "not_found", "compute lost the task again after a resubmission", ""
                    )
                    return self._failed(live, prediction, task, error)
                resubmitted = True
                self._lost(live, task)
                compute_id = await self._submit(live, task)
                if isinstance(compute_id, ResourceError):
                    return self._failed(live, prediction, task, compute_id)
                self._attached(live, prediction, task, compute_id)
                backoff.reset()
            except ComputeError as exc:  # permanent, or transient past the retry budget
                # Giving up on following a task does not stop it: release it, so that it
                # does not run on (or hold its slot) for nothing.
                released = await release(self._compute, task, retry=self._release_retry)
                live.recorder.task_changed(task, note=f"given up: {released.note}")
                error = ResourceError.compute_failed(
                    exc.category, exc.message, task.compute_task_id
                )
                return self._failed(live, prediction, task, error)

    def _request(self, live: LiveGeneration, task: ComputeTask) -> TaskRequest:
        return TaskRequest(
            task_type=task.task_type,
            params=task.params,
            idempotency_key=task.id,  # a resubmission never starts a second task
            organization=live.generation.organization,
        )

    async def _earlier(self, live: LiveGeneration, task: ComputeTask) -> str:
        """The compute task an earlier run of a resumed generation may have created, or "".

        A workflow stopped between a submit and the commit of its answer (its replica shut
        down, or died) left no compute id; the task is looked up by its idempotency key
        before anything is submitted again, so one attempt is submitted once.
        """
        if not live.resumed:
            return ""
        try:
            found = await self._retry.call(
                lambda: self._compute.find(task.id), sleep=live.token.sleep
            )
        except ComputeError:
            return ""  # a submit under the same key finds the task all the same
        return found or ""

    async def _submit(self, live: LiveGeneration, task: ComputeTask) -> str | ResourceError:
        """Submit, retrying transient errors within the policy's budget; the error otherwise.

        The idempotency key is the task's id, so a retried submit whose answer was lost
        finds the task the first one created.
        """
        request = self._request(live, task)
        try:
            return await self._retry.call(
                lambda: self._compute.submit(request), sleep=live.token.sleep
            )
        except ComputeError as exc:
            released = await release(self._compute, task, retry=self._release_retry)
            if released.compute_id:
                task.compute_task_id = released.compute_id
                live.recorder.task_changed(
                    task, note=f"its submit failed, yet compute had created it: {released.note}"
                )
            return ResourceError.compute_failed(exc.category, exc.message, released.compute_id)

    def _attached(
        self, live: LiveGeneration, prediction: Prediction, task: ComputeTask, compute_id: str
    ) -> None:
        """Record that compute holds the task: RUNNING, and the generation PROCESSING."""
        recorder = live.recorder
        if live.generation.status is GenerationStatus.PENDING:
            recorder.generation_status(GenerationStatus.PROCESSING)
        changed_id = task.compute_task_id != compute_id
        task.compute_task_id = compute_id
        if task.status is TaskStatus.PENDING:
            recorder.task_status(task, TaskStatus.RUNNING)
        elif changed_id:
            recorder.task_changed(task)
        if prediction.status is PredictionStatus.PENDING:
            recorder.prediction_status(prediction, PredictionStatus.GENERATING)

    def _lost(self, live: LiveGeneration, task: ComputeTask) -> None:
        lost = task.compute_task_id
        log.info("compute lost task %s (%s); submitting it again", task.id, lost)
        task.previous_compute_task_ids = [*task.previous_compute_task_ids, lost]
        task.compute_task_id = ""
        task.attempt += 1
        task.progress = 0.0
        note = (
            f"compute backend {self._compute.name!r} no longer knows task {lost} (its work "
            f"was lost, e.g. it restarted); submitting attempt {task.attempt}"
        )
        live.recorder.task_changed(task, note=note)

    async def _follow(
        self, live: LiveGeneration, prediction: Prediction, task: ComputeTask, backoff: Backoff
    ) -> TaskOutcome:
        snapshots: AsyncIterator[TaskSnapshot] = aiter(self._compute.watch(task.compute_task_id))
        last_progress = 0.0
        first = True
        try:
            while True:
                snap = await live.token.race(anext(snapshots))
                backoff.reset()  # compute answered: a later fault starts a fresh budget
                if snap.status is TaskStatus.COMPLETED:
                    return await self._completed(live, prediction, task, snap)
                if snap.status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
                    category = snap.error_category or "internal"
                    message = snap.error_message or f"compute reported {snap.status.lower()}"
                    error = ResourceError.compute_failed(category, message, snap.compute_id)
                    return self._failed(live, prediction, task, error)
                now = time.monotonic()
                if snap.progress > task.progress:
                    task.progress = snap.progress
                    if now - last_progress >= self._progress_interval:
                        last_progress = now
                        live.recorder.task_changed(task, kind=EventKind.TASK_PROGRESS)
                if first or live.recorder.pending:
                    # Still running: make the attachment durable (an instant result would
                    # have been committed together with it instead).
                    first = False
                    live.flush_soon()
        except StopAsyncIteration:
            error = ResourceError.compute_failed(
                "internal", "compute ended the task without a result", task.compute_task_id
            )
            return self._failed(live, prediction, task, error)
        finally:
            await _close(snapshots)

    async def _completed(
        self, live: LiveGeneration, prediction: Prediction, task: ComputeTask, snap: TaskSnapshot
    ) -> TaskOutcome:
        if not snap.outputs:
            error = ResourceError.compute_failed(
                "internal", "compute returned no output", snap.compute_id
            )
            return self._failed(live, prediction, task, error)
        output = snap.outputs[0]
        if kind_of(output) != expected_kind(task.task_type):
            # The bytes were verified and probed: compute itself produced the wrong thing.
            raise ComputeError(
                "internal",
                f"compute returned {output.mime_type} for a {task.task_type.value} task",
            )
        try:
            blob = await self._files.put(output.data, output.mime_type)
        except StorageError as exc:
            # Followed again within the retry budget: compute keeps the finished output.
            raise ComputeError(
                ComputeErrorCategory.TRANSIENT, f"storing the output: {exc}"
            ) from exc
        created_at = utcnow()
        if blob.existed:
            # Bytes seen before, perhaps by this organization: its events must show the
            # time it first held them, as GetGeneration does (artifact_owners).
            async with self._store.read() as session:
                owned = await repository.owned_since(
                    session, live.generation.organization, blob.sha256
                )
            created_at = owned or created_at
        artifact = Artifact(
            sha256=blob.sha256,
            mime_type=output.mime_type,
            size_bytes=blob.size_bytes,
            width=output.width,
            height=output.height,
            uri=blob.uri,
            created_at=created_at,
            duration_s=output.duration_s,
            frame_count=output.frame_count,
            recipe=Recipe(
                task_type=task.task_type,
                parameters=task.params,
                seed=int(task.params.get("seed", output.seed)),
                backend=self._compute.name,
                input_sha256=input_hashes(task.params),
                provider=dict(output.recipe),
            ),
        )
        live.recorder.artifact_stored(artifact)
        if output.notes:
            live.recorder.task_changed(task, note="; ".join(output.notes))
        live.recorder.task_status(task, TaskStatus.COMPLETED)
        return TaskOutcome(artifact=artifact)

    @staticmethod
    def _failed(
        live: LiveGeneration, prediction: Prediction, task: ComputeTask, error: ResourceError
    ) -> TaskOutcome:
        live.recorder.task_status(task, TaskStatus.FAILED, error=error)
        return TaskOutcome(error=error)


async def _close(snapshots: AsyncIterator[TaskSnapshot]) -> None:
    close = getattr(snapshots, "aclose", None)
    if close is not None:
        await close()
