"""How a generation ends, shared by every workflow: settled, closed early, or failed.

Settling gives a generation whose predictions are all done its final status. Closing
ends it early (cancelled, expired or failed): compute is asked to release every task it
may hold, then every unfinished record is closed with the reason and the release noted,
and the terminal state is committed.

Closing never raises (bar the cancellation of a shutdown) and always ends in a terminal
state: a compute call that fails in any way (a ``ComputeError``, a malformed answer, an
unexpected exception) becomes a note on the task, and a commit that fails is written
again. A task with no compute id may still have reached compute (its submit created it,
then the answer was lost): it is looked up by its idempotency key and released too.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from server.compute.base import ComputeBackend, ComputeError
from server.compute.retry import RetryPolicy
from server.domain.enums import (
    AttemptStatus,
    GenerationStatus,
    PredictionStatus,
    StopReason,
    TaskStatus,
)
from server.domain.model import Code, ComputeTask, Generation, ResourceError
from server.orchestration.live import LiveGeneration, Stop

log = logging.getLogger(__name__)


def settle(live: LiveGeneration) -> None:
    """Give the generation its final status once every prediction is done."""
    generation = live.generation
    recorder = live.recorder
    if generation.done or any(not p.done for p in generation.predictions):
        return
    if generation.status is GenerationStatus.CANCELLING:
        # Cancelled while the last results came in: the cancel wins.
        recorder.generation_status(GenerationStatus.CANCELLED, error=ResourceError.cancelled())
        return
    completed = sum(p.status is PredictionStatus.COMPLETED for p in generation.predictions)
    if completed == len(generation.predictions):
        recorder.generation_status(GenerationStatus.COMPLETED)
    elif completed:
        recorder.generation_status(GenerationStatus.PARTIALLY_COMPLETED)
    else:
        recorder.generation_status(GenerationStatus.FAILED, error=none_completed(generation))


def none_completed(generation: Generation) -> ResourceError:
    """The generation's error when no prediction completed: the first failure's code."""
    failed = next((p for p in generation.predictions if p.error is not None), None)
    if failed is None or failed.error is None:
        return ResourceError(Code.ABORTED, "NO_PREDICTION_COMPLETED", "no prediction completed")
    first = failed.error
    return ResourceError(
        first.code, "NO_PREDICTION_COMPLETED", first.message, {"prediction_id": failed.id}
    )


async def close(
    live: LiveGeneration,
    compute: ComputeBackend,
    reason: Stop | ResourceError,
    *,
    retry: RetryPolicy | None = None,
) -> None:
    """End the generation early: release compute, then close every unfinished record.

    ``reason`` is a stop (cancel or deadline) or the error of an unexpected failure. A
    requested cancel wins over whatever else ended the workflow. Never raises but
    ``CancelledError``; a commit that keeps failing is logged and left to recovery.
    """
    generation = live.generation
    if generation.done:
        return
    unfinished = [t for p in generation.predictions for t in p.tasks if not t.done]
    releases = await asyncio.gather(*(release(compute, t, retry=retry) for t in unfinished))
    for task, released in zip(unfinished, releases, strict=True):
        task.compute_task_id = task.compute_task_id or released.compute_id
    notes = {t.id: released.note for t, released in zip(unfinished, releases, strict=True)}
    _record_closed(live, reason, notes)
    try:
        await live.flush_final()
    except Exception:
        # The database refuses the write again and again: nothing can be recorded now;
        # the next start (or another replica) resumes the generation and closes it.
        log.exception("the terminal commit of generation %s failed", live.id)


def _record_closed(
    live: LiveGeneration, reason: Stop | ResourceError, notes: dict[str, str]
) -> None:
    """Close every unfinished record of the generation with ``reason``."""
    generation = live.generation
    if generation.status is GenerationStatus.CANCELLING or reason is Stop.CANCELLED:
        error = ResourceError.cancelled()
        prediction_status, generation_status = (
            PredictionStatus.CANCELLED,
            GenerationStatus.CANCELLED,
        )
    elif isinstance(reason, ResourceError):
        error = reason
        prediction_status, generation_status = PredictionStatus.ERROR, GenerationStatus.FAILED
    else:
        error = ResourceError.deadline_exceeded()
        prediction_status, generation_status = PredictionStatus.ERROR, GenerationStatus.FAILED
    recorder = live.recorder
    for prediction in generation.predictions:
        for task in prediction.tasks:
            if not task.done:
                note = notes.get(task.id, "never reached compute")
                recorder.task_status(
                    task, TaskStatus.CANCELLED, error=ResourceError.cancelled(note)
                )
        shot = prediction.agentic
        if shot is not None and not prediction.done:
            for attempt in shot.attempts:
                if not attempt.done:
                    recorder.attempt_status(attempt, AttemptStatus.CANCELLED, error=error)
            shot.stop_reason = (
                StopReason.FAILED if isinstance(reason, ResourceError) else StopReason.CANCELLED
            )
        if not prediction.done:
            recorder.prediction_status(prediction, prediction_status, error=error)
    recorder.generation_status(generation_status, error=error)


# Releasing a task retries transient errors briefly: closing must not wait long on compute.
RELEASE_BUDGET_S = 10.0


def release_policy(retry: RetryPolicy) -> RetryPolicy:
    """The retry policy of releases: the compute policy's, its budget at most 10 s."""
    return RetryPolicy(
        base_s=retry.base_s, cap_s=retry.cap_s, budget_s=min(RELEASE_BUDGET_S, retry.budget_s)
    )


@dataclass(frozen=True, slots=True)
class Released:
    """What became of a task compute was asked to let go of."""

    note: str
    compute_id: str = ""


async def release(
    compute: ComputeBackend, task: ComputeTask, *, retry: RetryPolicy | None = None
) -> Released:
    """Ask compute to let go of ``task``, finding it by its idempotency key if need be.

    Never raises but ``CancelledError``: any failure becomes the note.
    """
    policy = retry or release_policy(RetryPolicy())
    compute_id = task.compute_task_id
    if not compute_id:
        try:
            found: str | None = await policy.call(lambda: compute.find(task.id))
        except Exception as exc:
            return Released(f"compute could not be asked for the task: {_why(exc, task)}")
        if not found:
            return Released("never reached compute")
        compute_id = found
    try:
        confirmed = await policy.call(lambda: compute.cancel(compute_id))
    except Exception as exc:
        return Released(f"compute did not confirm release: {_why(exc, task)}", compute_id)
    if confirmed is not True:
        return Released("compute did not confirm release", compute_id)
    found = "" if compute_id == task.compute_task_id else " (found by its idempotency key)"
    return Released(f"compute confirmed release{found}", compute_id)


def _why(exc: Exception, task: ComputeTask) -> str:
    """What a failed compute call may tell the caller: a category's message, else nothing."""
    if isinstance(exc, ComputeError):
        return exc.message
    log.error("releasing task %s failed unexpectedly", task.id, exc_info=exc)
    return "an unexpected error (logged)"
