"""Engine and session factory: one engine per process, SQLite tuned as DESIGN §8 asks."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, event, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

from server.config import DatabaseSettings


def is_sqlite(url: str) -> bool:
    """Tell whether ``url`` names an SQLite database."""
    return url.startswith("sqlite")


def create_engine(
    settings: DatabaseSettings, *, foreign_keys: bool = True, **options: Any
) -> AsyncEngine:
    """Build an engine, with SQLite set up on every new connection.

    SQLite connections run in WAL mode with ``synchronous=NORMAL``, a busy timeout and
    foreign keys on (unless ``foreign_keys`` is false, for migrations). The driver's own
    transaction handling is switched off and ``BEGIN`` is emitted here instead: the
    stock driver never begins a transaction before DDL, so a migration would commit
    table by table (the SQLAlchemy recipe for pysqlite/aiosqlite).

    Args:
        settings: where the database is and how to talk to it.
        foreign_keys: enforce foreign keys on SQLite connections.
        options: passed to ``create_async_engine``.

    Returns:
        The async engine; the caller owns it and must ``dispose()`` it.
    """
    engine = create_async_engine(settings.url, echo=settings.echo, **options)
    if is_sqlite(settings.url):
        _set_up_sqlite(engine.sync_engine, settings, foreign_keys=foreign_keys)
    return engine


def sqlite_path(url: str) -> str:
    """The file an SQLite URL names.

    Raises:
        ValueError: the URL names no file (an in-memory database).
    """
    database = make_url(url).database
    if not database or database == ":memory:":
        raise ValueError("an SQLite database in a file is required")
    return database


def _set_up_sqlite(engine: Engine, settings: DatabaseSettings, *, foreign_keys: bool) -> None:
    busy = int(settings.busy_timeout_ms)
    keys = "ON" if foreign_keys else "OFF"

    @event.listens_for(engine, "connect")
    def _setup(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # autocommit at the driver; we say BEGIN
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={busy}")
        cursor.execute(f"PRAGMA foreign_keys={keys}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for units of work; objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)
