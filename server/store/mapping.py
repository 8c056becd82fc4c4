"""Rows to domain records: the only place that knows both shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from server.domain import model
from server.domain.enums import (
    AttemptStatus,
    GenerationStatus,
    GenerationType,
    PredictionStatus,
    StopReason,
    Strategy,
    TaskStatus,
    TaskType,
)
from server.store import models as rows


def error(stored: dict[str, Any] | None) -> model.ResourceError | None:
    """A stored error (the JSON form of ``model.ResourceError``), or None."""
    if not stored:
        return None
    return model.from_json(model.ResourceError, stored)


def stored_error(value: model.ResourceError | None) -> dict[str, Any] | None:
    """The JSON form of an error, for a JSON column."""
    return None if value is None else model.to_json(value)


def recipe(stored: dict[str, Any] | None) -> model.Recipe | None:
    """A stored recipe (the JSON form of ``model.Recipe``), or None."""
    return None if not stored else model.from_json(model.Recipe, stored)


def artifact(
    row: rows.Artifact,
    stored_recipe: dict[str, Any] | None = None,
    owned_at: datetime | None = None,
) -> model.Artifact:
    """An artifact row as a domain record, as its viewer owns it.

    ``stored_recipe`` and ``owned_at`` come from the viewer's ownership row: its recipe
    and when it first held the artifact.
    """
    return model.Artifact(
        sha256=row.sha256,
        mime_type=row.mime_type,
        size_bytes=row.size_bytes,
        width=row.width,
        height=row.height,
        uri=row.uri,
        # Without an ownership row (none should lack one), the content's own time.
        created_at=owned_at or row.created_at,
        duration_s=row.duration_s,
        frame_count=row.frame_count,
        recipe=recipe(stored_recipe),
    )


def stored_recipe(recipe: model.Recipe) -> dict[str, Any]:
    """The JSON form of a recipe, for the artifacts table."""
    return model.to_json(recipe)


def task(row: rows.Task) -> model.ComputeTask:
    """A task row as a domain record."""
    return model.ComputeTask(
        id=row.id,
        prediction_id=row.prediction_id,
        task_type=TaskType(row.task_type),
        status=TaskStatus(row.status),
        params=row.params,
        created_at=row.created_at,
        progress=row.progress,
        attempt=row.attempt,
        compute_task_id=row.compute_task_id or "",
        previous_compute_task_ids=list(row.previous_compute_task_ids),
        attempt_id=row.attempt_id,
        attempt_number=row.attempt_number,
        step=row.step,
        error=error(row.error),
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def attempt(row: rows.Attempt) -> model.Attempt:
    """An attempt row as a domain record."""
    return model.Attempt(
        id=row.id,
        prediction_id=row.prediction_id,
        number=row.number,
        status=AttemptStatus(row.status),
        seed=row.seed,
        created_at=row.created_at,
        task_ids=list(row.task_ids),
        adjustments=row.adjustments,
        adjustment_reason=row.adjustment_reason,
        evaluation=None
        if row.evaluation is None
        else model.from_json(model.Evaluation, row.evaluation),
        artifact=None
        if row.artifact is None
        else artifact(row.artifact, row.recipe, row.artifact_owned_at),
        error=error(row.error),
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def shot(
    row: rows.OrchestratedShot | None,
    *,
    with_attempts: bool,
    config: model.AgenticConfig | None = None,
) -> model.OrchestratedShot | None:
    """A shot row (with its attempts when asked) as a domain record, or None.

    ``config`` is the generation's AGENTIC configuration (the row keeps all of it but
    the expectations).
    """
    if row is None:
        return None
    return model.OrchestratedShot(
        config=config
        or model.AgenticConfig(row.max_attempts, row.min_confidence_score, row.evaluation_provider),
        attempt_count=row.attempt_count,
        best_attempt=row.best_attempt,
        stop_reason=None if row.stop_reason is None else StopReason(row.stop_reason),
        attempts=[attempt(a) for a in row.attempts] if with_attempts else [],
        plan=[model.from_json(model.PlannedStep, step) for step in row.plan],
    )


def prediction(
    row: rows.Prediction,
    *,
    with_tasks: bool = True,
    agentic: model.AgenticConfig | None = None,
) -> model.Prediction:
    """A prediction row (with its tasks and attempts when asked) as a domain record."""
    return model.Prediction(
        id=row.id,
        index=row.index,
        seed=row.seed,
        status=PredictionStatus(row.status),
        created_at=row.created_at,
        artifact=None
        if row.artifact is None
        else artifact(row.artifact, row.recipe, row.artifact_owned_at),
        score=row.score,
        tasks=[task(t) for t in row.tasks] if with_tasks else [],
        agentic=shot(row.shot, with_attempts=with_tasks, config=agentic),
        error=error(row.error),
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def orchestration(stored: dict[str, Any]) -> model.Orchestration:
    """The stored orchestration choice."""
    agentic = stored.get("agentic")
    return model.Orchestration(
        type=GenerationType(stored["type"]),
        agentic=None if not agentic else model.from_json(model.AgenticConfig, agentic),
    )


def generation(
    row: rows.Generation, *, with_tasks: bool = True, with_labels: bool = True
) -> model.Generation:
    """A generation row and its tree as a domain record."""
    chosen = orchestration(row.orchestration)
    return model.Generation(
        id=row.id,
        organization=row.organization,
        type=GenerationType(row.type),
        strategy=Strategy(row.strategy),
        status=GenerationStatus(row.status),
        params=row.params,
        orchestration=chosen,
        created_at=row.created_at,
        request_id=row.request_id or "",
        fingerprint=row.fingerprint,
        labels={label.key: label.value for label in row.labels} if with_labels else {},
        predictions=[
            prediction(p, with_tasks=with_tasks, agentic=chosen.agentic) for p in row.predictions
        ],
        error=error(row.error),
        started_at=row.started_at,
        finished_at=row.finished_at,
        deadline_at=row.deadline_at,
        event_seq=row.event_seq,
        refinement=None
        if row.refinement is None
        else model.from_json(model.Refine, row.refinement),
    )


def catalog_entity(row: rows.CatalogEntity) -> model.CatalogEntity:
    """A catalog row and its reference images as a domain record."""
    return model.CatalogEntity(
        id=row.id,
        organization=row.organization,
        kind=row.kind,
        name=row.name,
        description=row.description,
        created_at=row.created_at,
        reference_images=[
            model.ReferenceImage(
                sha256=ref.artifact.sha256,
                mime_type=ref.artifact.mime_type,
                width=ref.artifact.width,
                height=ref.artifact.height,
                # The name, whatever the row holds (a server path before 0008): the
                # catalog's answers are encoded from this record.
                uri=model.artifact_name(ref.artifact.sha256),
            )
            for ref in row.reference_images
        ],
        lora_uri=row.lora_uri,
        lora_default_weight=row.lora_default_weight,
    )
