"""Units of work: one transaction each, events appended in it and published after commit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.domain import model
from server.domain.enums import EventKind, GenerationStatus, PredictionStatus, TaskStatus
from server.domain.events import GenerationEvent, encode
from server.domain.model import PredictionCounts
from server.domain.states import (
    GENERATION_TERMINAL,
    GENERATION_TRANSITIONS,
    PREDICTION_TRANSITIONS,
    TASK_TERMINAL,
    TASK_TRANSITIONS,
    check_transition,
)
from server.store import mapping
from server.store.events import EventBus
from server.store.models import Generation, Prediction, Task, utcnow
from server.store.models import GenerationEvent as EventRow


def prediction_counts(generation: Generation) -> PredictionCounts:
    """Count the generation's predictions by status."""
    counts = dict.fromkeys(PredictionStatus, 0)
    for prediction in generation.predictions:
        counts[PredictionStatus(prediction.status)] += 1
    return PredictionCounts(**{status.value.lower(): n for status, n in counts.items()})


class UnitOfWork:
    """One transaction: the session, plus the events it will publish once committed."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.events: list[GenerationEvent] = []

    def emit(self, generation: Generation, event: GenerationEvent) -> None:
        """Append ``event`` as the generation's next one, gap-free, in this transaction."""
        generation.event_seq += 1
        event.sequence = generation.event_seq
        self.session.add(
            EventRow(
                generation_id=generation.id,
                sequence=event.sequence,
                time=event.time,
                kind=event.kind.value,
                terminal=event.terminal,
                payload=encode(event),
            )
        )
        self.events.append(event)

    def _event(self, row: Generation, kind: EventKind, **fields: Any) -> GenerationEvent:
        return GenerationEvent(
            generation_id=row.id,
            sequence=0,
            time=utcnow(),
            kind=kind,
            terminal=False,
            counts=prediction_counts(row),
            **fields,
        )

    def created(self, generation: Generation) -> None:
        """Record the new generation, its whole tree as Get shows it, as event 1."""
        snapshot = mapping.generation(generation)
        snapshot.event_seq = generation.event_seq + 1
        self.emit(
            generation, self._event(generation, EventKind.GENERATION_CREATED, generation=snapshot)
        )

    def generation_changed(self, generation: Generation) -> None:
        """Record the generation's own fields after a change."""
        snapshot = model.without_children(
            mapping.generation(generation, with_tasks=False, with_labels=False)
        )
        event = self._event(generation, EventKind.GENERATION_CHANGED, generation=snapshot)
        event.terminal = GenerationStatus(generation.status) in GENERATION_TERMINAL
        self.emit(generation, event)

    def set_generation_status(
        self,
        generation: Generation,
        target: GenerationStatus,
        *,
        error: model.ResourceError | None = None,
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
            generation.error = mapping.stored_error(error)
        self.generation_changed(generation)

    def prediction_changed(self, generation: Generation, prediction: Prediction) -> None:
        """Record a prediction's own fields after a change."""
        snapshot = model.prediction_alone(mapping.prediction(prediction, with_tasks=False))
        self.emit(
            generation, self._event(generation, EventKind.PREDICTION_CHANGED, prediction=snapshot)
        )

    def set_prediction_status(
        self,
        generation: Generation,
        prediction: Prediction,
        target: PredictionStatus,
        *,
        error: model.ResourceError | None = None,
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
            prediction.error = mapping.stored_error(error)
        self.prediction_changed(generation, prediction)

    def set_task_status(
        self,
        generation: Generation,
        task: Task,
        target: TaskStatus,
        *,
        error: model.ResourceError | None = None,
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
            task.error = mapping.stored_error(error)
        self.task_event(generation, task, EventKind.TASK_CHANGED)

    def task_added(self, generation: Generation, task: Task) -> None:
        """Record a task added after creation (a chain's next step), with its parameters."""
        snapshot = model.task_change(mapping.task(task), with_params=True)
        self.emit(generation, self._event(generation, EventKind.TASK_CHANGED, task=snapshot))

    def task_event(
        self, generation: Generation, task: Task, kind: EventKind, *, note: str = ""
    ) -> None:
        """Record the task's current state (a status change, progress, or a resubmission).

        ``note`` says why, when the status alone does not.
        """
        snapshot = model.task_change(mapping.task(task), with_params=False)
        self.emit(generation, self._event(generation, kind, task=snapshot, note=note))


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
