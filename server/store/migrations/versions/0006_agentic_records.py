"""agentic records: shots and attempts as the AGENTIC workflow keeps them

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28

Until this revision AGENTIC requests were refused, so both tables are empty: they are
dropped and created again in their working shape.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_table("attempts")
    op.drop_table("orchestrated_shots")
    op.create_table(
        "orchestrated_shots",
        sa.Column("prediction_id", sa.String(length=36), nullable=False),
        sa.Column("generation_id", sa.String(length=36), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("min_confidence_score", sa.Float(), nullable=False),
        sa.Column("evaluation_provider", sa.String(length=64), nullable=False),
        sa.Column("attempt_count", sa.Integer(), nullable=False),
        sa.Column("best_attempt", sa.Integer(), nullable=False),
        sa.Column("stop_reason", sa.String(length=32), nullable=True),
        sa.Column("plan", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["generation_id"],
            ["generations.id"],
            name=op.f("fk_orchestrated_shots_generation_id_generations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["predictions.id"],
            name=op.f("fk_orchestrated_shots_prediction_id_predictions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("prediction_id", name=op.f("pk_orchestrated_shots")),
    )
    op.create_index(
        "ix_orchestrated_shots_generation", "orchestrated_shots", ["generation_id"], unique=False
    )
    op.create_table(
        "attempts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("generation_id", sa.String(length=36), nullable=False),
        sa.Column("prediction_id", sa.String(length=36), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("task_ids", sa.JSON(), nullable=False),
        sa.Column("adjustments", sa.JSON(), nullable=False),
        sa.Column("adjustment_reason", sa.Text(), nullable=False),
        sa.Column("evaluation", sa.JSON(), nullable=True),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=True),
        sa.Column("recipe", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["artifact_sha256"],
            ["artifacts.sha256"],
            name=op.f("fk_attempts_artifact_sha256_artifacts"),
        ),
        sa.ForeignKeyConstraint(
            ["generation_id"],
            ["generations.id"],
            name=op.f("fk_attempts_generation_id_generations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["orchestrated_shots.prediction_id"],
            name=op.f("fk_attempts_prediction_id_orchestrated_shots"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_attempts")),
        sa.UniqueConstraint(
            "prediction_id", "number", name=op.f("uq_attempts_prediction_id_number")
        ),
    )
    op.create_index("ix_attempts_generation", "attempts", ["generation_id"], unique=False)


def downgrade() -> None:
    # The old shape held no data (AGENTIC was refused); going back is not supported.
    raise NotImplementedError("0006 cannot be downgraded; restore a backup instead")
