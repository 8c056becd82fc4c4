"""engine core: generation ownership and leases, the organization-wide event cursor

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

Existing events get the columns WatchGenerations filters on from their generation, and
cursors in (time, generation, sequence) order.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
    with op.batch_alter_table("generation_events", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("organization", sa.String(length=128), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("cursor", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch_op.add_column(
            sa.Column("generation_status", sa.String(length=32), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("strategy", sa.String(length=32), nullable=False, server_default="")
        )
        batch_op.add_column(
            sa.Column("type", sa.String(length=16), nullable=False, server_default="")
        )
        batch_op.add_column(sa.Column("payload_proto", sa.LargeBinary(), nullable=True))
        batch_op.alter_column("payload", existing_type=sa.JSON(), nullable=True)
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT e.generation_id, e.sequence, g.organization, g.strategy, g.type, g.status"
            " FROM generation_events e JOIN generations g ON g.id = e.generation_id"
            " ORDER BY e.time, e.generation_id, e.sequence"
        )
    ).all()
    for cursor, row in enumerate(rows, start=1):
        bind.execute(
            sa.text(
                "UPDATE generation_events SET organization = :org, cursor = :cursor,"
                " generation_status = :status, strategy = :strategy, type = :type"
                " WHERE generation_id = :gid AND sequence = :seq"
            ),
            {
                "org": row.organization,
                "cursor": cursor,
                "status": row.status,
                "strategy": row.strategy,
                "type": row.type,
                "gid": row.generation_id,
                "seq": row.sequence,
            },
        )
    with op.batch_alter_table("generation_events", schema=None) as batch_op:
        batch_op.create_index(
            "ix_generation_events_org_cursor", ["organization", "cursor"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("generation_events", schema=None) as batch_op:
        batch_op.drop_index("ix_generation_events_org_cursor")
        for column in (
            "payload_proto",
            "type",
            "strategy",
            "generation_status",
            "cursor",
            "organization",
        ):
            batch_op.drop_column(column)
    with op.batch_alter_table("generations", schema=None) as batch_op:
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("owner")
