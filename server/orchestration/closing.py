"""How a generation ends, shared by every workflow: settled, closed early, or failed.

Settling gives a generation whose predictions are all done its final status. Closing
ends it early (cancelled, expired or failed): compute is asked to release every task it
holds, then every unfinished record is closed with the reason and the release noted.
"""

from __future__ import annotations

import asyncio

from server.compute.base import ComputeBackend, ComputeError
from server.compute.retry import RetryPolicy
from server.domain.enums import (
    AttemptStatus,
    GenerationStatus,
    PredictionStatus,
    StopReason,
    TaskStatus,
)
from server.domain.model import Code, Generation, ResourceError
from server.orchestration.live import LiveGeneration, Stop


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
    live: LiveGeneration, compute: ComputeBackend, reason: Stop | ResourceError
) -> None:
    """End the generation early: release compute, then close every unfinished record.

    ``reason`` is a stop (cancel or deadline) or the error of an unexpected failure. A
    requested cancel wins over whatever else ended the workflow.
    """
    generation = live.generation
    if generation.done:
        return
    held = [t for p in generation.predictions for t in p.tasks if not t.done and t.compute_task_id]
    notes = await asyncio.gather(*(_release(compute, t.compute_task_id) for t in held))
    released = {t.id: note for t, note in zip(held, notes, strict=True)}
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
                note = released.get(task.id, "never reached compute")
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
    await live.flush()


# Releasing a task retries transient errors briefly: closing must not wait long on compute.
RELEASE_RETRY = RetryPolicy(budget_s=10.0)


async def _release(compute: ComputeBackend, compute_id: str) -> str:
    try:
        confirmed = await RELEASE_RETRY.call(lambda: compute.cancel(compute_id))
    except ComputeError as exc:
        return f"compute did not confirm release: {exc.message}"
    return "compute confirmed release" if confirmed else "compute did not confirm release"
