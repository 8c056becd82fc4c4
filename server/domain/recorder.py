"""Every change to a live generation goes through here: checked, applied, turned into events.

A workflow owns its generation's records in memory. Each change is checked against the
transition tables, applied to the records, and appended as a typed event carrying a
snapshot of the changed resource. ``take`` then hands over what one commit must write:
the rows changed since the last take (their latest state) and the events, in order.

Records are treated as immutable values below their top level: a change rebinds a field
(``task.previous_compute_task_ids = [*old, new]``), never mutates a shared list, so a
shallow copy is a safe snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from server.domain.enums import (
    AttemptStatus,
    EventKind,
    GenerationStatus,
    PredictionStatus,
    TaskStatus,
)
from server.domain.errors import IllegalTransitionError
from server.domain.events import GenerationEvent
from server.domain.model import (
    Artifact,
    Attempt,
    ComputeTask,
    Generation,
    Prediction,
    PredictionCounts,
    ResourceError,
    clone,
    prediction_alone,
    task_change,
    without_children,
)
from server.domain.states import (
    ATTEMPT_TERMINAL,
    ATTEMPT_TRANSITIONS,
    GENERATION_TERMINAL,
    GENERATION_TRANSITIONS,
    PREDICTION_TERMINAL,
    PREDICTION_TRANSITIONS,
    TASK_TERMINAL,
    TASK_TRANSITIONS,
    check_transition,
)


def utcnow() -> datetime:
    """The current time, aware, in UTC."""
    return datetime.now(UTC)


@dataclass(slots=True)
class Changes:
    """What one commit writes for one generation: latest row states and the events.

    ``generation`` is the generation row (no children); ``new`` says it is being
    created (its labels are written too). Artifacts are new content rows, each owned by
    the generation's organization with its recipe.
    """

    generation: Generation
    new: bool
    predictions: list[Prediction] = field(default_factory=list)
    tasks: list[ComputeTask] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)
    events: list[GenerationEvent] = field(default_factory=list)


def full_snapshot(generation: Generation) -> Generation:
    """A copy of the whole tree that later changes to the records cannot alter."""
    predictions = []
    for prediction in generation.predictions:
        agentic = prediction.agentic
        if agentic is not None:
            attempts = [clone(a) for a in agentic.attempts]
            agentic = clone(agentic, attempts=attempts)
        tasks = [clone(t) for t in prediction.tasks]
        predictions.append(clone(prediction, tasks=tasks, agentic=agentic))
    return clone(generation, predictions=predictions)


class Recorder:
    """Applies the changes of one generation and collects them until ``take``."""

    def __init__(self, generation: Generation, *, new: bool = False) -> None:
        self.generation = generation
        self._new = new
        self._generation_dirty = new
        self._predictions: dict[str, Prediction] = {}
        self._tasks: dict[str, ComputeTask] = {}
        self._attempts: dict[str, Attempt] = {}
        self._artifacts: list[Artifact] = []
        self._events: list[GenerationEvent] = []
        self._terminated = generation.status in GENERATION_TERMINAL

    @property
    def pending(self) -> bool:
        """Whether anything was recorded since the last ``take``."""
        return bool(self._events) or self._generation_dirty or bool(self._tasks)

    def take(self) -> Changes:
        """Everything recorded since the last call, as one commit's worth; then reset."""
        generation = self.generation
        changes = Changes(
            generation=clone(generation, predictions=[]),
            new=self._new,
            predictions=[prediction_alone(p) for p in self._predictions.values()],
            tasks=[clone(t) for t in self._tasks.values()],
            attempts=[clone(a) for a in self._attempts.values()],
            artifacts=self._artifacts,
            events=self._events,
        )
        self._new = False
        self._generation_dirty = False
        self._predictions = {}
        self._tasks = {}
        self._attempts = {}
        self._artifacts = []
        self._events = []
        return changes

    # -- events -------------------------------------------------------------------------

    def _emit(self, kind: EventKind, *, note: str = "", **resource: object) -> None:
        generation = self.generation
        if self._terminated:
            raise IllegalTransitionError(f"{kind} after the terminal event of {generation.id}")
        generation.event_seq += 1
        self._generation_dirty = True
        self._events.append(
            GenerationEvent(
                generation_id=generation.id,
                sequence=generation.event_seq,
                time=utcnow(),
                kind=kind,
                terminal=generation.status in GENERATION_TERMINAL
                and kind is EventKind.GENERATION_CHANGED,
                counts=PredictionCounts.of(generation.predictions),
                note=note,
                organization=generation.organization,
                status=generation.status,
                strategy=generation.strategy,
                type=generation.type,
                labels=generation.labels,
                created_at=generation.created_at,
                **resource,  # type: ignore[arg-type]
            )
        )
        if self._events[-1].terminal:
            self._terminated = True

    def created(self) -> Generation:
        """Event 1: the new generation, its whole tree as Get shows it; returns that tree."""
        snapshot = full_snapshot(self.generation)
        snapshot.event_seq = self.generation.event_seq + 1
        for prediction in self.generation.predictions:
            self._predictions[prediction.id] = prediction
            for task in prediction.tasks:
                self._tasks[task.id] = task
            if prediction.agentic is not None:
                for attempt in prediction.agentic.attempts:
                    self._attempts[attempt.id] = attempt
        self._emit(EventKind.GENERATION_CREATED, generation=snapshot)
        return snapshot

    def _generation_changed(self) -> None:
        self._emit(EventKind.GENERATION_CHANGED, generation=without_children(self.generation))

    def prediction_changed(self, prediction: Prediction, *, note: str = "") -> None:
        """Record a change of a prediction's own fields (artifact, score, AGENTIC state)."""
        self._predictions[prediction.id] = prediction
        self._emit(EventKind.PREDICTION_CHANGED, note=note, prediction=prediction_alone(prediction))

    def task_changed(
        self, task: ComputeTask, *, kind: EventKind = EventKind.TASK_CHANGED, note: str = ""
    ) -> None:
        """Record a change of a task that is not a status change (compute id, attempt)."""
        self._tasks[task.id] = task
        self._emit(kind, note=note, task=task_change(task, with_params=False))

    def task_params(self, task: ComputeTask, params: dict[str, Any], *, note: str = "") -> None:
        """Record new parameters of a task (an image input resolved), sent with the event."""
        task.params = params
        self._tasks[task.id] = task
        self._emit(EventKind.TASK_CHANGED, note=note, task=task_change(task, with_params=True))

    def task_added(self, prediction: Prediction, task: ComputeTask) -> None:
        """Record a new task of a prediction's chain (with its parameters)."""
        prediction.tasks = [*prediction.tasks, task]
        self._tasks[task.id] = task
        self._emit(EventKind.TASK_CHANGED, task=task_change(task, with_params=True))

    def attempt_changed(self, attempt: Attempt, *, note: str = "") -> None:
        """Record a new or changed AGENTIC attempt."""
        self._attempts[attempt.id] = attempt
        self._emit(EventKind.ATTEMPT_CHANGED, note=note, attempt=clone(attempt))

    def artifact_stored(self, artifact: Artifact) -> None:
        """Record a new output artifact (its content row and this organization's recipe)."""
        self._artifacts.append(artifact)

    # -- transitions --------------------------------------------------------------------

    def generation_status(
        self, target: GenerationStatus, *, error: ResourceError | None = None
    ) -> None:
        """Move the generation to ``target``.

        Raises:
            IllegalTransitionError: the state machine forbids the move.
        """
        generation = self.generation
        check_transition(GENERATION_TRANSITIONS, generation.status, target)
        generation.status = target
        now = utcnow()
        if target is GenerationStatus.PROCESSING:
            generation.started_at = now
        if target in GENERATION_TERMINAL:
            generation.finished_at = now
        if error is not None:
            generation.error = error
        self._generation_changed()

    def prediction_status(
        self,
        prediction: Prediction,
        target: PredictionStatus,
        *,
        error: ResourceError | None = None,
        note: str = "",
    ) -> None:
        """Move a prediction to ``target``.

        Raises:
            IllegalTransitionError: the state machine forbids the move.
        """
        check_transition(PREDICTION_TRANSITIONS, prediction.status, target)
        prediction.status = target
        now = utcnow()
        if target is PredictionStatus.GENERATING and prediction.started_at is None:
            prediction.started_at = now
        if target in PREDICTION_TERMINAL:
            prediction.finished_at = now
        if error is not None:
            prediction.error = error
        self.prediction_changed(prediction, note=note)

    def task_status(
        self, task: ComputeTask, target: TaskStatus, *, error: ResourceError | None = None
    ) -> None:
        """Move a task to ``target``.

        Raises:
            IllegalTransitionError: the state machine forbids the move.
        """
        check_transition(TASK_TRANSITIONS, task.status, target)
        task.status = target
        now = utcnow()
        if target is TaskStatus.RUNNING:
            task.started_at = now
        if target in TASK_TERMINAL:
            task.finished_at = now
        if target is TaskStatus.COMPLETED:
            task.progress = 1.0
        if error is not None:
            task.error = error
        self.task_changed(task)

    def attempt_status(
        self,
        attempt: Attempt,
        target: AttemptStatus,
        *,
        error: ResourceError | None = None,
        note: str = "",
    ) -> None:
        """Move an AGENTIC attempt to ``target``.

        Raises:
            IllegalTransitionError: the state machine forbids the move.
        """
        check_transition(ATTEMPT_TRANSITIONS, attempt.status, target)
        attempt.status = target
        now = utcnow()
        if target is AttemptStatus.RUNNING and attempt.started_at is None:
            attempt.started_at = now
        if target in ATTEMPT_TERMINAL:
            attempt.finished_at = now
        if error is not None:
            attempt.error = error
        self.attempt_changed(attempt, note=note)
