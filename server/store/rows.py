"""Domain records to table rows, and the ordered operations a batch writes.

The writer executes one statement per (table, operation) for a whole batch, in the
order of ``TABLE_ORDER`` so rows exist before the rows that refer to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Table

from server.contract import encode as contract
from server.domain import model
from server.domain.events import GenerationEvent
from server.domain.recorder import Changes
from server.store import models


class Mode(StrEnum):
    """How a row is written."""

    INSERT = "insert"  # a new row
    UPSERT = "upsert"  # insert, or replace every column of the row with this key
    IGNORE = "ignore"  # insert unless a row with this key exists (content addressing)
    OWN = "own"  # artifact ownership: insert, or fill in a recipe the owner lacked
    DELETE = "delete"  # remove the row with this key


@dataclass(frozen=True, slots=True)
class Op:
    """One row to write."""

    table: Table
    mode: Mode
    row: dict[str, Any]


def _t(model_class: type[models.Base]) -> Table:
    table = model_class.__table__
    if not isinstance(table, Table):
        raise TypeError(f"{model_class} is not mapped to a table")
    return table


ARTIFACTS = _t(models.Artifact)
OWNERS = _t(models.ArtifactOwner)
ENTITIES = _t(models.CatalogEntity)
REFERENCE_IMAGES = _t(models.CatalogReferenceImage)
GENERATIONS = _t(models.Generation)
LABELS = _t(models.GenerationLabel)
PREDICTIONS = _t(models.Prediction)
TASKS = _t(models.Task)
SHOTS = _t(models.OrchestratedShot)
ATTEMPTS = _t(models.Attempt)
EVENTS = _t(models.GenerationEvent)

TABLE_ORDER = (
    (ARTIFACTS, Mode.IGNORE),
    (OWNERS, Mode.OWN),
    (ENTITIES, Mode.INSERT),
    (REFERENCE_IMAGES, Mode.INSERT),
    (GENERATIONS, Mode.UPSERT),
    (LABELS, Mode.INSERT),
    (PREDICTIONS, Mode.UPSERT),
    (SHOTS, Mode.UPSERT),
    (ATTEMPTS, Mode.UPSERT),
    (TASKS, Mode.UPSERT),
    (EVENTS, Mode.INSERT),
    (ENTITIES, Mode.DELETE),
)


def _error(value: model.ResourceError | None) -> dict[str, Any] | None:
    return None if value is None else model.to_json(value)


def artifact_row(artifact: model.Artifact) -> dict[str, Any]:
    """The shared content row of an artifact."""
    return {
        "sha256": artifact.sha256,
        "mime_type": artifact.mime_type,
        "size_bytes": artifact.size_bytes,
        "width": artifact.width,
        "height": artifact.height,
        "duration_s": artifact.duration_s,
        "frame_count": artifact.frame_count,
        "uri": artifact.uri,
        "created_at": artifact.created_at,
    }


def owner_row(
    organization: str, sha256: str, recipe: model.Recipe | None, created_at: datetime
) -> dict[str, Any]:
    """An organization's ownership of an artifact, with its recipe when it is an output."""
    return {
        "organization": organization,
        "sha256": sha256,
        "recipe": None if recipe is None else model.to_json(recipe),
        "created_at": created_at,
    }


def generation_row(
    generation: model.Generation, *, owner: str | None, lease_expires_at: datetime | None
) -> dict[str, Any]:
    """A generation's own row; the owner and lease are cleared once it is done."""
    done = generation.done
    refinement = generation.refinement
    return {
        "id": generation.id,
        "organization": generation.organization,
        "type": generation.type.value,
        "strategy": generation.strategy.value,
        "status": generation.status.value,
        "request_id": generation.request_id or None,
        "fingerprint": generation.fingerprint,
        "params": generation.params,
        "orchestration": model.to_json(generation.orchestration),
        "error": _error(generation.error),
        "created_at": generation.created_at,
        "started_at": generation.started_at,
        "finished_at": generation.finished_at,
        "deadline_at": generation.deadline_at,
        "event_seq": generation.event_seq,
        "refinement": None if refinement is None else model.to_json(refinement),
        "owner": None if done else owner,
        "lease_expires_at": None if done else lease_expires_at,
        # Claims and cancel requests are written by their own statements (``leases``);
        # these are only a new row's values (SQLite writes every column).
        "fence": 0,
        "cancel_requested_at": None,
    }


def prediction_row(prediction: model.Prediction, generation_id: str) -> dict[str, Any]:
    """A prediction's row; its recipe is its artifact's."""
    artifact = prediction.artifact
    recipe = None if artifact is None or artifact.recipe is None else artifact.recipe
    return {
        "id": prediction.id,
        "generation_id": generation_id,
        "index": prediction.index,
        "seed": prediction.seed,
        "status": prediction.status.value,
        "artifact_sha256": None if artifact is None else artifact.sha256,
        "score": prediction.score,
        "recipe": None if recipe is None else model.to_json(recipe),
        "error": _error(prediction.error),
        "created_at": prediction.created_at,
        "started_at": prediction.started_at,
        "finished_at": prediction.finished_at,
    }


def task_row(task: model.ComputeTask, generation_id: str) -> dict[str, Any]:
    """A compute task's row."""
    return {
        "id": task.id,
        "generation_id": generation_id,
        "prediction_id": task.prediction_id,
        "task_type": task.task_type.value,
        "status": task.status.value,
        "progress": task.progress,
        "attempt": task.attempt,
        "compute_task_id": task.compute_task_id or None,
        "previous_compute_task_ids": task.previous_compute_task_ids,
        "attempt_id": task.attempt_id,
        "attempt_number": task.attempt_number,
        "step": task.step,
        "params": task.params,
        "error": _error(task.error),
        "created_at": task.created_at,
        "started_at": task.started_at,
        "finished_at": task.finished_at,
    }


def shot_row(prediction: model.Prediction, generation_id: str) -> dict[str, Any]:
    """An AGENTIC prediction's shot row (config, progress, stop reason, plan)."""
    shot = prediction.agentic
    if shot is None:
        raise ValueError(f"prediction {prediction.id} is not AGENTIC")
    return {
        "prediction_id": prediction.id,
        "generation_id": generation_id,
        "max_attempts": shot.config.max_attempts,
        "min_confidence_score": shot.config.min_confidence_score,
        "evaluation_provider": shot.config.evaluation_provider,
        "attempt_count": shot.attempt_count,
        "best_attempt": shot.best_attempt,
        "stop_reason": None if shot.stop_reason is None else shot.stop_reason.value,
        "plan": [model.to_json(step) for step in shot.plan],
    }


def attempt_row(attempt: model.Attempt, generation_id: str) -> dict[str, Any]:
    """An AGENTIC attempt's row; its recipe is its artifact's."""
    artifact = attempt.artifact
    recipe = None if artifact is None else artifact.recipe
    evaluation = attempt.evaluation
    return {
        "id": attempt.id,
        "generation_id": generation_id,
        "prediction_id": attempt.prediction_id,
        "number": attempt.number,
        "status": attempt.status.value,
        "seed": attempt.seed,
        "task_ids": attempt.task_ids,
        "adjustments": attempt.adjustments,
        "adjustment_reason": attempt.adjustment_reason,
        "evaluation": None if evaluation is None else model.to_json(evaluation),
        "artifact_sha256": None if artifact is None else artifact.sha256,
        "recipe": None if recipe is None else model.to_json(recipe),
        "error": _error(attempt.error),
        "created_at": attempt.created_at,
        "started_at": attempt.started_at,
        "finished_at": attempt.finished_at,
    }


def event_row(event: GenerationEvent) -> dict[str, Any]:
    """An event's row, its payload the contract's message; ``cursor`` comes at commit.

    The message is kept on the event, so watchers reuse it instead of encoding again.
    """
    message = event.encoded = contract.event(event)
    return {
        "generation_id": event.generation_id,
        "sequence": event.sequence,
        "time": event.time,
        "kind": event.kind.value,
        "terminal": event.terminal,
        "payload": None,
        "payload_proto": message.SerializeToString(),
        "organization": event.organization,
        "cursor": 0,
        "generation_status": "" if event.status is None else event.status.value,
        "strategy": "" if event.strategy is None else event.strategy.value,
        "type": "" if event.type is None else event.type.value,
    }


def changes_ops(changes: Changes, *, owner: str | None, lease_expires_at: datetime) -> list[Op]:
    """Every row one generation's changes write."""
    generation = changes.generation
    ops: list[Op] = []
    for artifact in changes.artifacts:
        ops.append(Op(ARTIFACTS, Mode.IGNORE, artifact_row(artifact)))
        owned = owner_row(
            generation.organization, artifact.sha256, artifact.recipe, artifact.created_at
        )
        ops.append(Op(OWNERS, Mode.OWN, owned))
    ops.append(
        Op(
            GENERATIONS,
            Mode.UPSERT,
            generation_row(generation, owner=owner, lease_expires_at=lease_expires_at),
        )
    )
    if changes.new:
        ops.extend(
            Op(LABELS, Mode.INSERT, {"generation_id": generation.id, "key": k, "value": v})
            for k, v in sorted(generation.labels.items())
        )
    ops.extend(
        Op(PREDICTIONS, Mode.UPSERT, prediction_row(p, generation.id)) for p in changes.predictions
    )
    ops.extend(
        Op(SHOTS, Mode.UPSERT, shot_row(p, generation.id))
        for p in changes.predictions
        if p.agentic is not None
    )
    ops.extend(Op(ATTEMPTS, Mode.UPSERT, attempt_row(a, generation.id)) for a in changes.attempts)
    ops.extend(Op(TASKS, Mode.UPSERT, task_row(t, generation.id)) for t in changes.tasks)
    ops.extend(Op(EVENTS, Mode.INSERT, event_row(e)) for e in changes.events)
    return ops


def catalog_ops(entity: model.CatalogEntity, artifacts: list[model.Artifact]) -> list[Op]:
    """The rows of a new catalog entity: new image content, ownership, entity, images."""
    ops: list[Op] = []
    for artifact in artifacts:
        ops.append(Op(ARTIFACTS, Mode.IGNORE, artifact_row(artifact)))
    for image in entity.reference_images:
        ops.append(
            Op(
                OWNERS,
                Mode.OWN,
                owner_row(entity.organization, image.sha256, None, entity.created_at),
            )
        )
    ops.append(
        Op(
            ENTITIES,
            Mode.INSERT,
            {
                "id": entity.id,
                "organization": entity.organization,
                "kind": entity.kind,
                "name": entity.name,
                "description": entity.description,
                "lora_uri": entity.lora_uri,
                "lora_default_weight": entity.lora_default_weight,
                "created_at": entity.created_at,
            },
        )
    )
    ops.extend(
        Op(
            REFERENCE_IMAGES,
            Mode.INSERT,
            {"entity_id": entity.id, "position": position, "artifact_sha256": image.sha256},
        )
        for position, image in enumerate(entity.reference_images)
    )
    return ops


def upload_ops(organization: str, artifact: model.Artifact) -> list[Op]:
    """An uploaded artifact: its content row (if new) and the uploader's ownership."""
    return [
        Op(ARTIFACTS, Mode.IGNORE, artifact_row(artifact)),
        Op(OWNERS, Mode.OWN, owner_row(organization, artifact.sha256, None, artifact.created_at)),
    ]


def delete_entity_op(entity_id: str) -> Op:
    """Remove a catalog entity (its reference image rows go with it)."""
    return Op(ENTITIES, Mode.DELETE, {"id": entity_id})
