"""generations.fence and cancel_requested_at: ownership across replicas

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03

Replicas on one PostgreSQL database claim live generations. Every claim raises the
generation's fencing number, and every write transaction checks it, so an owner that was
paused or cut off past its lease commits nothing once another replica has claimed. A
cancel that arrives at a replica which does not run the generation is recorded here for
its owner to carry out.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("fence", sa.BigInteger(), server_default="0", nullable=False))
        batch.add_column(sa.Column("cancel_requested_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("generations") as batch:
        batch.drop_column("cancel_requested_at")
        batch.drop_column("fence")
