"""service secrets: a page-token key shared by every replica of one database

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10

Without SARTIQ_SERVER__PAGE_TOKEN_SECRET each process signed page tokens with a random
key of its own, so a token from one replica (or from before a restart) was refused by
another. The first server to start now creates a random key here and every server of
the database uses it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_service_secrets")),
    )


def downgrade() -> None:
    op.drop_table("service_secrets")
