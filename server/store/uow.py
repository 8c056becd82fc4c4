"""Units of work: one transaction each, events appended in it and published after commit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.domain.enums import EventKind, GenerationStatus, PredictionStatus, TaskStatus
from server.domain.states import (
    GENERATION_TERMINAL,
    GENERATION_TRANSITIONS,
    PREDICTION_TRANSITIONS,
    TASK_TERMINAL,
    TASK_TRANSITIONS,
    check_transition,
)
from server.store.events import EventBus, EventRecord
from server.store.models import Artifact, Generation, GenerationEvent, Prediction, Task, utcnow


def error_dict(reason: str | None, message: str | None) -> dict[str, str] | None:
    """The payload form of an error, or None when there is none."""
    if reason is None and message is None:
        return None
    return {"reason": reason or "", "message": message or ""}


def artifact_dict(artifact: Artifact | None) -> dict[str, Any] | None:
    """The payload form of an artifact, or None."""
    return None if artifact is None else artifact_fields(artifact)


def artifact_fields(artifact: Artifact) -> dict[str, Any]:
    """An artifact's identity and shape, named as in the Artifact message."""
    return {
        "sha256": artifact.sha256,
        "mime_type": artifact.mime_type,
        "size_bytes": artifact.size_bytes,
        "width": artifact.width,
        "height": artifact.height,
        "uri": artifact.uri,
    }


def task_error(task: Task) -> dict[str, str] | None:
    """The payload form of a task's error: a reason, the message and the compute category."""
    if task.error_category is None and task.error_message is None:
        return None
    reason = "CANCELLED" if task.status == TaskStatus.CANCELLED else "COMPUTE_FAILED"
    return {
        "reason": reason,
        "message": task.error_message or "",
        "category": task.error_category or "",
    }


def prediction_counts(generation: Generation) -> dict[str, int]:
    """Count the generation's predictions by status."""
    counts = {status.value.lower(): 0 for status in PredictionStatus}
    for prediction in generation.predictions:
        counts[prediction.status.lower()] += 1
    return counts


class UnitOfWork:
    """One transaction: the session, plus the events it will publish once committed."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.events: list[EventRecord] = []

    def emit(
        self, generation: Generation, kind: EventKind, payload: dict[str, Any], *, terminal: bool
    ) -> None:
        """Append the generation's next event, gap-free, in this transaction."""
        generation.event_seq += 1
        row = GenerationEvent(
            generation_id=generation.id,
            sequence=generation.event_seq,
            time=utcnow(),
            kind=kind.value,
            terminal=terminal,
            payload=payload,
        )
        self.session.add(row)
        self.events.append(
            EventRecord(generation.id, row.sequence, row.time, kind, terminal, payload)
        )

    def generation_event(self, generation: Generation) -> None:
        """Record the generation's current status as an event."""
        status = GenerationStatus(generation.status)
        payload = {
            "status": status.value,
            "error": error_dict(generation.error_reason, generation.error_message),
            "counts": prediction_counts(generation),
        }
        self.emit(generation, EventKind.GENERATION, payload, terminal=status in GENERATION_TERMINAL)

    def set_generation_status(
        self,
        generation: Generation,
        target: GenerationStatus,
        *,
        error: tuple[str, str] | None = None,
    ) -> None:
        """Move the generation to ``target`` and record it.

        Raises:
            IllegalTransitionError: the state machine forbids the move.
        """
        check_transition(GENERATION_TRANSITIONS, GenerationStatus(generation.status), target)
        generation.status = target.value
        now = utcnow()
        if target is GenerationStatus.PROCESSING:
            generation.started_at = now
        if target in GENERATION_TERMINAL:
            generation.finished_at = now
        if error is not None:
            generation.error_reason, generation.error_message = error
        self.generation_event(generation)

    def set_prediction_status(
        self,
        generation: Generation,
        prediction: Prediction,
        target: PredictionStatus,
        *,
        error: tuple[str, str] | None = None,
    ) -> None:
        """Move a prediction to ``target`` and record it."""
        check_transition(PREDICTION_TRANSITIONS, PredictionStatus(prediction.status), target)
        prediction.status = target.value
        now = utcnow()
        if target is PredictionStatus.GENERATING and prediction.started_at is None:
            prediction.started_at = now
        if not PREDICTION_TRANSITIONS[target]:
            prediction.finished_at = now
        if error is not None:
            prediction.error_reason, prediction.error_message = error
        payload = {
            "prediction_id": prediction.id,
            "index": prediction.index,
            "status": target.value,
            "artifact": artifact_dict(prediction.artifact),
            "error": error_dict(prediction.error_reason, prediction.error_message),
            "score": prediction.score,
        }
        self.emit(generation, EventKind.PREDICTION, payload, terminal=False)

    def set_task_status(
        self,
        generation: Generation,
        task: Task,
        target: TaskStatus,
        *,
        error: tuple[str, str] | None = None,
    ) -> None:
        """Move a task to ``target`` and record it."""
        check_transition(TASK_TRANSITIONS, TaskStatus(task.status), target)
        task.status = target.value
        now = utcnow()
        if target is TaskStatus.RUNNING:
            task.started_at = now
        if target in TASK_TERMINAL:
            task.finished_at = now
        if target is TaskStatus.COMPLETED:
            task.progress = 1.0
        if error is not None:
            task.error_category, task.error_message = error
        self.task_event(generation, task, EventKind.TASK)

    def task_event(
        self, generation: Generation, task: Task, kind: EventKind, *, note: str = ""
    ) -> None:
        """Record the task's current state (a status change, progress, or a resubmission).

        ``note`` says why, when the status alone does not.
        """
        payload = {
            "task_id": task.id,
            "prediction_id": task.prediction_id,
            "status": task.status,
            "progress": task.progress,
            "compute_task_id": task.compute_task_id or "",
            "attempt": task.attempt,
            "previous_compute_task_ids": list(task.previous_compute_task_ids),
            "error": task_error(task),
        }
        if note:
            payload["note"] = note
        self.emit(generation, kind, payload, terminal=False)


class Store:
    """Hands out units of work and read sessions over one session factory.

    With SQLite there is a single writer: write transactions are serialised here, so the
    database never answers "locked" and each unit of work is one trip to the driver.
    """

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], bus: EventBus, *, single_writer: bool
    ) -> None:
        self._sessions = sessions
        self.bus = bus
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if single_writer else None

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[UnitOfWork]:
        """Run one transaction; commit on success, then publish its events."""
        async with contextlib.AsyncExitStack() as stack:
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
            session = await stack.enter_async_context(self._sessions())
            uow = UnitOfWork(session)
            async with session.begin():
                yield uow
        self.bus.publish(uow.events)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only."""
        async with self._sessions() as session:
            yield session
