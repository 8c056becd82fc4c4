"""organization_cursors: per-organization event cursors taken inside the committing transaction

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-10

Several replicas writing events of one organization must not number them from memory
(they would collide, or a number taken first could become visible after a larger one).
On PostgreSQL the writer now raises this row's counter in the transaction that inserts
the events; the row is seeded with each organization's last stored cursor.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "organization_cursors",
        sa.Column("organization", sa.String(length=128), nullable=False),
        sa.Column("last_cursor", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("organization", name=op.f("pk_organization_cursors")),
    )
    op.execute(
        "INSERT INTO organization_cursors (organization, last_cursor)"
        " SELECT organization, max(cursor) FROM generation_events GROUP BY organization"
    )


def downgrade() -> None:
    op.drop_table("organization_cursors")
