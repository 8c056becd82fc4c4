"""Engine and session factory: one engine per process, SQLite tuned as DESIGN §8 asks."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

from server.config import DatabaseSettings


def is_sqlite(url: str) -> bool:
    """Tell whether ``url`` names an SQLite database."""
    return url.startswith("sqlite")


def create_engine(settings: DatabaseSettings) -> AsyncEngine:
    """Build the process's engine, with SQLite pragmas set on every new connection.

    Args:
        settings: where the database is and how to talk to it.

    Returns:
        The async engine; the caller owns it and must ``dispose()`` it.
    """
    engine = create_async_engine(settings.url, echo=settings.echo)
    if is_sqlite(settings.url):
        busy = settings.busy_timeout_ms

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for units of work; objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)
