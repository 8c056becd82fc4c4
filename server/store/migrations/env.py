"""Alembic environment: runs on the connection the service hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from server.store.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        # Every dialect we run on can roll DDL back (SQLite once BEGIN is ours, see
        # server.store.db), so all pending migrations commit together or not at all.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


_connection = context.config.attributes.get("connection")
if _connection is None:
    raise RuntimeError("run migrations through server.store.migrate, which passes a connection")
_run(_connection)
