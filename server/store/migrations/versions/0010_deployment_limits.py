"""admission limits counted for the whole deployment: live counts and call-rate buckets

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03

Replicas on one PostgreSQL database count live generations in ``live_counts`` (one row
per organization, one for the deployment), changed in the transactions that create and
end generations, and share each organization's call-rate bucket in ``rate_buckets``.
On PostgreSQL the counts start from the generations live at the upgrade, counted while
writes to ``generations`` wait, so they are right from the first create after it.
Replicas of an earlier release do not keep them: stop those before the first replica of
this one starts. On SQLite the one process counts in memory and the tables stay empty.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The terminal generation statuses as of this revision (not imported: a migration
# keeps meaning what it meant when it was written).
_TERMINAL = "('COMPLETED', 'PARTIALLY_COMPLETED', 'FAILED', 'CANCELLED')"


def upgrade() -> None:
    op.create_table(
        "live_counts",
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("organization", sa.String(length=128), nullable=False),
        sa.Column("live", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "organization", name=op.f("pk_live_counts")),
    )
    op.create_table(
        "rate_buckets",
        sa.Column("organization", sa.String(length=128), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("refilled_at", sa.Float(), nullable=False),
        sa.Column("granted", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("organization", name=op.f("pk_rate_buckets")),
    )
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    # Writers still running hold their creates and endings until this transaction
    # commits, so none falls between the count and the commit.
    bind.execute(sa.text("LOCK TABLE generations IN SHARE MODE"))
    bind.execute(
        sa.text(
            "INSERT INTO live_counts (scope, organization, live)"
            " SELECT 'organization', organization, count(*) FROM generations"
            f" WHERE status NOT IN {_TERMINAL} GROUP BY organization"
            " UNION ALL"
            " SELECT 'deployment', '', count(*) FROM generations"
            f" WHERE status NOT IN {_TERMINAL}"
        )
    )


def downgrade() -> None:
    op.drop_table("rate_buckets")
    op.drop_table("live_counts")
