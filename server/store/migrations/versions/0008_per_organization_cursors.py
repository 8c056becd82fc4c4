"""per-organization event cursors; artifact URIs are resource names

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

Cursors were one counter over every organization, so the gaps between a tenant's
cursors told it how busy the others were. Each organization's events are numbered
1, 2, 3... again in the order they were committed, and (organization, cursor) becomes
unique. A cursor a client saved before this revision no longer points where it did:
resume WatchGenerations from 0 (everything again) or -1 (from now on).

Artifact rows held the server's path to their file as their URI; they now hold the
resource name ``artifacts/<sha256>``.
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_INDEX = "ix_generation_events_org_cursor"
_RENUMBER = sa.text(
    "UPDATE generation_events SET cursor = :cursor WHERE generation_id = :gid AND sequence = :seq"
)


def upgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT organization, generation_id, sequence FROM generation_events"
            " ORDER BY organization, cursor, generation_id, sequence"
        )
    ).all()
    numbered: list[dict[str, Any]] = []
    organization, cursor = None, 0
    for row in rows:
        cursor = cursor + 1 if row.organization == organization else 1
        organization = row.organization
        numbered.append({"cursor": cursor, "gid": row.generation_id, "seq": row.sequence})
    if numbered:
        bind.execute(_RENUMBER, numbered)
    op.drop_index(_INDEX, table_name="generation_events")
    op.create_index(_INDEX, "generation_events", ["organization", "cursor"], unique=True)
    bind.execute(sa.text("UPDATE artifacts SET uri = 'artifacts/' || sha256"))


def downgrade() -> None:
    # One counter over every organization again, in commit order as far as it is known.
    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT generation_id, sequence FROM generation_events"
            " ORDER BY time, generation_id, sequence"
        )
    ).all()
    numbered = [
        {"cursor": cursor, "gid": row.generation_id, "seq": row.sequence}
        for cursor, row in enumerate(rows, start=1)
    ]
    op.drop_index(_INDEX, table_name="generation_events")
    if numbered:
        bind.execute(_RENUMBER, numbered)
    op.create_index(_INDEX, "generation_events", ["organization", "cursor"], unique=False)
