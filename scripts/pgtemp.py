"""A throwaway PostgreSQL database next to a server's URL, for tests and benchmarks."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine


@asynccontextmanager
async def fresh_database(server_url: str, prefix: str = "sartiq_test") -> AsyncIterator[str]:
    """Create an empty database on ``server_url``'s server, yield its URL, then drop it.

    Dropping closes the connections still open to it (``WITH (FORCE)``).
    """
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
        finally:
            async with admin.connect() as conn:
                await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()
