"""Migrations: they yield the models' schema, and no crash or old database leaves a dead end."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import schema_diff
from procs import run_process, server_env
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from server.config import DatabaseSettings
from server.store.db import create_engine
from server.store.migrate import MigrationError, head_revision, upgrade_to_head
from server.store.models import Base


def _pragmas(connection: Connection) -> tuple[Any, ...]:
    journal = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
    keys = connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
    sync = connection.exec_driver_sql("PRAGMA synchronous").scalar()
    return journal, keys, sync


async def test_migrated_schema_equals_models(tmp_path: Path) -> None:
    settings = DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    engine = create_engine(settings)
    try:
        await upgrade_to_head(settings)
        await upgrade_to_head(settings)  # a second run is a no-op
        async with engine.connect() as conn:
            assert await conn.run_sync(schema_diff) == []
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            assert {"generations", "predictions", "tasks", "generation_events"} <= tables
            assert await conn.run_sync(_pragmas) == ("wal", 1, 1)
    finally:
        await engine.dispose()


# Run in a child process: migrate, and SIGKILL the process right after its Nth
# CREATE TABLE reached the database, as a crash mid-migration would.
_KILL_MID_MIGRATION = """
import asyncio, os, signal, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine
from server.config import DatabaseSettings
from server.store.migrate import upgrade_to_head

url, kill_after = sys.argv[1], int(sys.argv[2])
created = 0

@event.listens_for(Engine, "after_cursor_execute")
def _die(conn, cursor, statement, *args):
    global created
    if statement.lstrip().upper().startswith("CREATE TABLE"):
        created += 1
        if created == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(upgrade_to_head(DatabaseSettings(url=url)))
"""


@pytest.mark.parametrize("kill_after", [1, 4, 9])
async def test_a_kill_mid_migration_leaves_a_database_that_starts(
    tmp_path: Path, kill_after: int
) -> None:
    settings = DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    child = await run_process(
        [sys.executable, "-c", _KILL_MID_MIGRATION, settings.url, str(kill_after)]
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            # Nothing of the interrupted migration was committed.
            assert await conn.run_sync(lambda c: inspect(c).get_table_names()) == []
        await upgrade_to_head(settings)
        async with engine.connect() as conn:
            assert await conn.run_sync(schema_diff) == []
    finally:
        await engine.dispose()


async def _half_migrated(settings: DatabaseSettings, *, with_rows: bool) -> None:
    """Tables of the models but no version row, as older releases left after a kill."""
    engine = create_engine(settings)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            if with_rows:
                await conn.execute(
                    text(
                        "INSERT INTO artifacts (sha256, mime_type, size_bytes, width, height,"
                        " uri, created_at) VALUES ('ab', 'image/png', 1, 1, 1, 'x', '2026-01-01')"
                    )
                )
    finally:
        await engine.dispose()


async def test_empty_half_migrated_database_is_repaired(tmp_path: Path) -> None:
    settings = DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await _half_migrated(settings, with_rows=False)
    await upgrade_to_head(settings)
    engine = create_engine(settings)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(schema_diff) == []
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
            assert [row[0] for row in version] == [head_revision()]
    finally:
        await engine.dispose()


async def test_half_migrated_database_with_data_is_refused_clearly(tmp_path: Path) -> None:
    settings = DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await _half_migrated(settings, with_rows=True)
    with pytest.raises(MigrationError, match=r"no schema version.*artifacts hold data"):
        await upgrade_to_head(settings)
    # The service says so and exits non-zero instead of a traceback.
    env = server_env(tmp_path)
    env["SARTIQ_DATABASE__URL"] = settings.url
    child = await run_process([sys.executable, "-m", "server"], env=env)
    assert child.returncode == 2
    assert "sartiq-server: cannot start:" in child.stderr
    assert "Traceback" not in child.stderr


async def test_database_from_a_newer_release_is_refused_clearly(tmp_path: Path) -> None:
    settings = DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    await upgrade_to_head(settings)
    engine = create_engine(settings)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        await engine.dispose()
    with pytest.raises(MigrationError, match="'9999', which this release does not know"):
        await upgrade_to_head(settings)
