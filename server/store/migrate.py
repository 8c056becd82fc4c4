"""Run the package's Alembic migrations, all of them in one transaction, crash-safe.

Every pending migration and the version row commit together or not at all: on SQLite
the connection drives ``BEGIN`` itself (``db.create_engine``), so DDL is transactional
there as it is on PostgreSQL. A process killed mid-migration leaves the database as it
was. Databases left half-migrated by releases before this one (tables but no version
row) are repaired when those tables are empty, and refused with a clear message when
they hold data.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import MetaData, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from server.config import DatabaseSettings
from server.domain.errors import StartupError
from server.store.db import create_engine, is_sqlite
from server.store.models import Base

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"
# Any constant: replicas starting at once on PostgreSQL migrate one after the other.
_PG_LOCK_KEY = 0x5A471C


class MigrationError(StartupError):
    """The database cannot be brought to this release's schema; the message says why."""


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this release ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise MigrationError("no migrations are packaged")
    return head


def _stored_revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    row = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).first()
    return None if row is None else str(row[0])


def _repair_unversioned(connection: Connection) -> None:
    """Drop the empty tables an interrupted first migration of an older release left behind.

    Raises:
        MigrationError: some of those tables hold rows; nothing is dropped.
    """
    present = set(inspect(connection).get_table_names())
    ours = [t for t in Base.metadata.sorted_tables if t.name in present]
    if not ours:
        return
    filled = [
        t.name
        for t in ours
        if connection.execute(text(f'SELECT 1 FROM "{t.name}" LIMIT 1')).first()
    ]
    if filled:
        raise MigrationError(
            "the database has this service's tables but no schema version, and "
            f"{', '.join(sorted(filled))} hold data: it was not created by a complete "
            "migration. Restore it from a backup or move it aside to start empty."
        )
    leftover = MetaData()
    for table in ours:
        table.to_metadata(leftover)
    leftover.drop_all(connection)


def _upgrade(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
    stored = _stored_revision(connection)
    if stored is None:
        _repair_unversioned(connection)
    try:
        command.upgrade(alembic_config(connection), "head")
    except CommandError as exc:
        raise MigrationError(
            f"the database is at schema revision {stored!r}, which this release does not "
            f"know (its newest is {head_revision()!r}); run a release at least as new as "
            f"the one that migrated it. ({exc})"
        ) from exc
    if connection.dialect.name == "sqlite":
        problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if problems:
            raise MigrationError(f"migration left broken foreign keys: {problems[:5]}")


async def upgrade_to_head(settings: DatabaseSettings) -> None:
    """Bring the database to the newest schema in one transaction; a no-op when there already.

    Runs on a connection of its own. On SQLite foreign keys are off during the
    migration (table rebuilds need it) and checked in full before the commit.

    Raises:
        MigrationError: the database cannot be migrated; nothing was changed.
    """
    engine = create_engine(settings, poolclass=NullPool, foreign_keys=not is_sqlite(settings.url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade)
    finally:
        await engine.dispose()
