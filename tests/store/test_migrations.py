"""Migrations: they yield the models' schema, and no crash or old database leaves a dead end."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from helpers import schema_diff
from procs import run_process, server_env
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from server.config import DatabaseSettings
from server.contract import encode as contract
from server.store import mapping, repository
from server.store.db import create_engine, create_session_factory
from server.store.migrate import MigrationError, alembic_config, head_revision, upgrade_to_head
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
from server.contract import encode as contract
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


_LEGACY_ROWS = [
    "INSERT INTO artifacts (sha256, mime_type, size_bytes, width, height, uri, recipe, created_at)"
    " VALUES (:sha, 'image/png', 3, 8, 8, 'file:///x.png',"
    ' \'{"task_type": "GENERATION", "parameters": {"seed": 5}, "seed": 5, "backend": "local"}\','
    " '2026-11-27 10:00:00')",
    "INSERT INTO generations (id, organization, type, strategy, status, request_id, fingerprint,"
    " params, orchestration, error_reason, error_message, created_at, expire_at, event_seq)"
    " VALUES ('g1', 'default', 'BASE', 'GENERATE', 'PARTIALLY_COMPLETED', 'r1', 'f',"
    ' \'{"shot_type_string": "front", "batch_size": 2}\', \'{"type": "BASE"}\', NULL, NULL,'
    " '2026-11-27 10:00:00', '2026-11-28 10:00:00', 3)",
    'INSERT INTO predictions (id, generation_id, "index", seed, status, artifact_sha256,'
    " error_reason, error_message, created_at) VALUES"
    " ('p1', 'g1', 0, 5, 'COMPLETED', :sha, NULL, NULL, '2026-11-27 10:00:00'),"
    " ('p2', 'g1', 1, 6, 'ERROR', NULL, 'COMPUTE_FAILED', 'gpu down', '2026-11-27 10:00:00')",
    "INSERT INTO tasks (id, generation_id, prediction_id, task_type, status, progress, attempt,"
    " compute_task_id, params, error_category, error_message, created_at,"
    " previous_compute_task_ids) VALUES"
    " ('t1', 'g1', 'p1', 'GENERATION', 'COMPLETED', 1, 1, 'c1', '{}', NULL, NULL,"
    " '2026-11-27 10:00:00', '[]'),"
    " ('t2', 'g1', 'p2', 'GENERATION', 'FAILED', 0, 1, 'c2', '{}', 'transient', 'gpu down',"
    " '2026-11-27 10:00:00', '[]')",
    "INSERT INTO generation_events (generation_id, sequence, time, kind, terminal, payload) VALUES"
    " ('g1', 1, '2026-11-27 10:00:00', 'GENERATION', 0,"
    ' \'{"status": "PENDING", "error": null, "counts": {"pending": 2}}\'),'
    " ('g1', 2, '2026-11-27 10:00:01', 'TASK', 0, '{\"task_id\": \"t2\", \"prediction_id\":"
    ' "p2", "status": "FAILED", "progress": 0, "compute_task_id": "c2", "attempt": 1,'
    ' "error": {"reason": "COMPUTE_FAILED", "message": "gpu down", "category": "transient"}}\'),'
    " ('g1', 3, '2026-11-27 10:00:02', 'PREDICTION', 0, '{\"prediction_id\": \"p1\","
    ' "index": 0, "status": "COMPLETED", "artifact": {"sha256": "SHA", "mime_type":'
    ' "image/png", "size_bytes": 3, "width": 8, "height": 8, "uri": "file:///x.png"},'
    ' "error": null, "score": null}\')',
]


async def test_0003_carries_an_existing_database_forward(tmp_path: Path) -> None:
    settings = DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    sha = "ab" * 32
    engine = create_engine(settings)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), "0002"))
            for statement in _LEGACY_ROWS:
                await conn.execute(text(statement.replace("SHA", sha)), {"sha": sha})
    finally:
        await engine.dispose()
    await upgrade_to_head(settings)
    engine = create_engine(settings)
    try:
        sessions = create_session_factory(engine)
        async with sessions() as session:
            generation = mapping.generation(
                await repository.get_generation(session, "default", "g1") or _missing()
            )
            events = await repository.events_after(session, "g1", 0, 10)
            owned = await repository.get_owned_artifact(session, "default", sha)
    finally:
        await engine.dispose()
    assert generation.deadline_at is not None
    first, second = generation.predictions
    assert first.artifact is not None
    assert first.artifact.recipe is not None
    assert first.artifact.recipe.seed == 5
    assert second.error is not None
    assert (second.error.reason, second.error.message) == ("COMPUTE_FAILED", "gpu down")
    task_error = second.tasks[0].error
    assert task_error is not None
    assert (task_error.code, task_error.metadata) == (14, {"category": "transient"})
    assert [e.kind.value for e in events] == [
        "GENERATION_CHANGED",
        "TASK_CHANGED",
        "PREDICTION_CHANGED",
    ]
    assert events[0].generation is not None
    assert events[0].counts.pending == 2
    assert events[1].task is not None
    assert events[1].task.error is not None
    assert events[1].task.error.metadata == {"category": "transient"}
    assert events[2].prediction is not None
    assert events[2].prediction.artifact is not None
    assert owned is not None  # the organization still sees its output
    # 0008: the row names the artifact instead of locating it, and so does the old event.
    assert first.artifact.uri == f"artifacts/{sha}"
    assert contract.event(events[2]).prediction.artifact.uri == f"artifacts/{sha}"


async def test_0008_numbers_each_organizations_events_from_1(tmp_path: Path) -> None:
    settings = DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
    # One counter over both tenants, as before 0008: a's events were 1, 2, 4, 7; b's 3, 5, 6.
    order = ["a", "a", "b", "a", "b", "b", "a"]
    engine = create_engine(settings)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda c: command.upgrade(alembic_config(c), "0007"))
            for org in "ab":
                await conn.execute(
                    text(
                        "INSERT INTO generations (id, organization, type, strategy, status,"
                        " fingerprint, params, orchestration, created_at, event_seq)"
                        " VALUES (:id, :org, 'BASE', 'GENERATE', 'PENDING', 'f', '{}', '{}',"
                        " '2026-11-27 10:00:00', 0)"
                    ),
                    {"id": f"g-{org}", "org": f"org-{org}"},
                )
            for cursor, org in enumerate(order, start=1):
                sequence = order[:cursor].count(org)
                await conn.execute(
                    text(
                        "INSERT INTO generation_events (generation_id, sequence, time, kind,"
                        " terminal, organization, cursor, generation_status, strategy, type)"
                        " VALUES (:gid, :seq, '2026-11-27 10:00:00', 'GENERATION_CHANGED', 0,"
                        " :org, :cursor, 'PENDING', 'GENERATE', 'BASE')"
                    ),
                    {"gid": f"g-{org}", "seq": sequence, "org": f"org-{org}", "cursor": cursor},
                )
    finally:
        await engine.dispose()
    await upgrade_to_head(settings)
    engine = create_engine(settings)
    try:
        async with engine.begin() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT organization, sequence, cursor FROM generation_events"
                        " ORDER BY organization, cursor"
                    )
                )
            ).all()
            assert [tuple(row) for row in rows] == [
                ("org-a", 1, 1),
                ("org-a", 2, 2),
                ("org-a", 3, 3),
                ("org-a", 4, 4),
                ("org-b", 1, 1),
                ("org-b", 2, 2),
                ("org-b", 3, 3),
            ]
            with pytest.raises(IntegrityError):  # one number, one event
                await conn.execute(
                    text("UPDATE generation_events SET cursor = 1 WHERE organization = 'org-b'")
                )
    finally:
        await engine.dispose()


def _missing() -> Any:
    raise AssertionError("the generation did not survive the migration")
