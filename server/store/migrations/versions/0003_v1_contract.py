"""the v1 contract's final shape: artifact owners, task chains, resource events

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28

Existing event logs are rewritten into the new shape (each event carries the changed
resource); the fields old events did not record are filled from the rows they describe.
Existing artifacts are given to the organizations whose generations or catalog entries
use them.
"""

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CODES = {"CANCELLED": 1, "DEADLINE_EXCEEDED": 4, "INTERNAL": 13}
_CATEGORY_CODES = {
    "validation": 3,
    "unsupported": 12,
    "transient": 14,
    "capacity": 8,
    "not_found": 5,
    "internal": 13,
}


def upgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("frame_count", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
    op.create_table(
        "artifact_owners",
        sa.Column("organization", sa.String(length=128), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("recipe", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sha256"], ["artifacts.sha256"], name=op.f("fk_artifact_owners_sha256_artifacts")
        ),
        sa.PrimaryKeyConstraint("organization", "sha256", name=op.f("pk_artifact_owners")),
    )
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.alter_column("expire_at", new_column_name="deadline_at")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("attempt_id", sa.String(length=36), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("attempt_number", sa.Integer(), nullable=False, server_default=sa.text("1"))
        )
        batch_op.add_column(
            sa.Column("step", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
    for table in ("generations", "predictions", "tasks"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("error", sa.JSON(), nullable=True))
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("recipe", sa.JSON(), nullable=True))
    _convert_errors()
    for table, old in (
        ("generations", ("error_reason", "error_message")),
        ("predictions", ("error_reason", "error_message")),
        ("tasks", ("error_category", "error_message")),
    ):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in old:
                batch_op.drop_column(column)
    _backfill_owners()
    _rewrite_events()
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_column("recipe")


def _convert_errors() -> None:
    """Carry the old reason/category and message columns into the JSON error."""
    bind = op.get_bind()
    for table, first in (
        ("generations", "error_reason"),
        ("predictions", "error_reason"),
        ("tasks", "error_category"),
    ):
        rows = bind.execute(
            sa.text(
                f"SELECT id, {first} AS first, error_message FROM {table} "
                f"WHERE {first} IS NOT NULL OR error_message IS NOT NULL"
            )
        ).all()
        for row in rows:
            if table == "tasks":
                old = {"category": row.first or "", "message": row.error_message or ""}
                old["reason"] = "CANCELLED" if old["category"] == "cancelled" else "COMPUTE_FAILED"
            else:
                old = {"reason": row.first or "", "message": row.error_message or ""}
            bind.execute(
                sa.text(f"UPDATE {table} SET error = :error WHERE id = :id"),
                {"error": json.dumps(_error(old)), "id": row.id},
            )


def _json(value: Any) -> str | None:
    """A JSON column's value as a parameter: stored text as is, anything else dumped."""
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def _backfill_owners() -> None:
    """Owners from existing outputs and catalog images; recipes move to owners and outputs."""
    bind = op.get_bind()
    recipes = {
        row.sha256: row.recipe
        for row in bind.execute(sa.text("SELECT sha256, recipe FROM artifacts"))
    }
    owners: dict[tuple[str, str], Any] = {}
    outputs = bind.execute(
        sa.text(
            "SELECT p.id, g.organization, p.artifact_sha256, g.created_at FROM predictions p "
            "JOIN generations g ON g.id = p.generation_id WHERE p.artifact_sha256 IS NOT NULL"
        )
    ).all()
    for row in outputs:
        recipe = recipes.get(row.artifact_sha256)
        owners.setdefault((row.organization, row.artifact_sha256), (recipe, row.created_at))
        if recipe is not None:
            bind.execute(
                sa.text("UPDATE predictions SET recipe = :recipe WHERE id = :id"),
                {"recipe": _json(recipe), "id": row.id},
            )
    images = bind.execute(
        sa.text(
            "SELECT e.organization, r.artifact_sha256, e.created_at FROM catalog_reference_images r "
            "JOIN catalog_entities e ON e.id = r.entity_id"
        )
    ).all()
    for row in images:
        owners.setdefault((row.organization, row.artifact_sha256), (None, row.created_at))
    for (organization, sha256), (recipe, created_at) in owners.items():
        bind.execute(
            sa.text(
                "INSERT INTO artifact_owners (organization, sha256, recipe, created_at) "
                "VALUES (:org, :sha, :recipe, :created)"
            ),
            {
                "org": organization,
                "sha": sha256,
                "recipe": _json(recipe),
                "created": created_at,
            },
        )


def _error(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if not value:
        return None
    reason = value.get("reason", "")
    category = value.get("category", "")
    if category and reason != "CANCELLED":
        return {
            "code": _CATEGORY_CODES.get(category, 13),
            "reason": "COMPUTE_FAILED",
            "message": value.get("message", ""),
            "metadata": {"category": category},
        }
    return {
        "code": _CODES.get(reason, 2),
        "reason": reason,
        "message": value.get("message", ""),
        "metadata": {},
    }


def _load(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else json.loads(value)


def _rows(bind: Any, sql: str) -> dict[str, Any]:
    return {row.id: row for row in bind.execute(sa.text(sql))}


def _rewrite_events() -> None:
    """Turn every legacy event payload into the resource-carrying shape."""
    bind = op.get_bind()
    generations = _rows(
        bind, "SELECT id, organization, type, strategy, created_at FROM generations"
    )
    predictions = _rows(bind, "SELECT id, seed, created_at FROM predictions")
    tasks = _rows(bind, "SELECT id, task_type, created_at FROM tasks")
    events = bind.execute(
        sa.text("SELECT generation_id, sequence, time, kind, payload FROM generation_events")
    ).all()
    for event in events:
        payload = _load(event.payload)
        if payload.get("v"):
            continue
        kind, body = _convert(event, payload, generations, predictions, tasks)
        bind.execute(
            sa.text(
                "UPDATE generation_events SET kind = :kind, payload = :payload "
                "WHERE generation_id = :gid AND sequence = :seq"
            ),
            {
                "kind": kind,
                "payload": json.dumps(body),
                "gid": event.generation_id,
                "seq": event.sequence,
            },
        )


def _stamp(value: Any) -> str:
    return value if isinstance(value, str) else value.isoformat()


def _convert(
    event: Any,
    payload: dict[str, Any],
    generations: dict[str, Any],
    predictions: dict[str, Any],
    tasks: dict[str, Any],
) -> tuple[str, dict[str, Any]]:
    generation = generations[event.generation_id]
    body: dict[str, Any] = {"v": 1, "counts": payload.get("counts", {}), "note": ""}
    if event.kind == "GENERATION":
        body["generation"] = {
            "id": generation.id,
            "organization": generation.organization,
            "type": generation.type,
            "strategy": generation.strategy,
            "status": payload["status"],
            "params": {},
            "orchestration": {"type": generation.type, "agentic": None},
            "created_at": _stamp(generation.created_at),
            "error": _error(payload.get("error")),
        }
        return "GENERATION_CHANGED", body
    if event.kind == "PREDICTION":
        row = predictions.get(payload["prediction_id"])
        artifact = payload.get("artifact")
        if artifact:
            artifact = {**artifact, "created_at": _stamp(event.time)}
        body["prediction"] = {
            "id": payload["prediction_id"],
            "index": payload["index"],
            "seed": row.seed if row else 0,
            "status": payload["status"],
            "created_at": _stamp(row.created_at if row else event.time),
            "artifact": artifact,
            "score": payload.get("score"),
            "error": _error(payload.get("error")),
        }
        return "PREDICTION_CHANGED", body
    row = tasks.get(payload["task_id"])
    body["note"] = payload.get("note", "")
    body["task"] = {
        "id": payload["task_id"],
        "prediction_id": payload["prediction_id"],
        "task_type": row.task_type if row else "GENERATION",
        "status": payload["status"],
        "params": {},
        "created_at": _stamp(row.created_at if row else event.time),
        "progress": payload.get("progress", 0.0),
        "attempt": payload.get("attempt", 1),
        "compute_task_id": payload.get("compute_task_id", ""),
        "previous_compute_task_ids": payload.get("previous_compute_task_ids", []),
        "error": _error(payload.get("error")),
    }
    return ("TASK_PROGRESS" if event.kind == "TASK_PROGRESS" else "TASK_CHANGED"), body


def downgrade() -> None:
    raise NotImplementedError("0003 rewrites event logs; restore a backup to go back")
