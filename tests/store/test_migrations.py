"""Migrating an empty database yields exactly the models' schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import schema_diff
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from server.config import DatabaseSettings
from server.store.db import create_engine
from server.store.migrate import upgrade_to_head


def _pragmas(connection: Connection) -> tuple[Any, ...]:
    journal = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
    keys = connection.exec_driver_sql("PRAGMA foreign_keys").scalar()
    sync = connection.exec_driver_sql("PRAGMA synchronous").scalar()
    return journal, keys, sync


async def test_migrated_schema_equals_models(tmp_path: Path) -> None:
    engine = create_engine(DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"))
    try:
        await upgrade_to_head(engine)
        await upgrade_to_head(engine)  # a second run is a no-op
        async with engine.connect() as conn:
            assert await conn.run_sync(schema_diff) == []
            tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
            assert {"generations", "predictions", "tasks", "generation_events"} <= tables
            assert await conn.run_sync(_pragmas) == ("wal", 1, 1)
    finally:
        await engine.dispose()
