"""drop refines: REFINE's record lives on its generation (generations.refinement, 0005)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28

The table came with the first schema and was never written: REFINE answered
UNIMPLEMENTED until 0005, which keeps the record as JSON on the generation.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_table("refines")


def downgrade() -> None:
    op.create_table(
        "refines",
        sa.Column("generation_id", sa.String(length=36), nullable=False),
        sa.Column("base_artifact_sha256", sa.String(length=64), nullable=False),
        sa.Column("target_width", sa.Integer(), nullable=False),
        sa.Column("target_height", sa.Integer(), nullable=False),
        sa.Column("upscale_enabled", sa.Boolean(), nullable=False),
        sa.Column("upscale_factor", sa.Float(), nullable=False),
        sa.Column("upscale_steps", sa.Integer(), nullable=False),
        sa.Column("upscale_denoise", sa.Float(), nullable=False),
        sa.Column("face_detail_enabled", sa.Boolean(), nullable=False),
        sa.Column("face_detail_steps", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_artifact_sha256"],
            ["artifacts.sha256"],
            name=op.f("fk_refines_base_artifact_sha256_artifacts"),
        ),
        sa.ForeignKeyConstraint(
            ["generation_id"],
            ["generations.id"],
            name=op.f("fk_refines_generation_id_generations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("generation_id", name=op.f("pk_refines")),
    )
