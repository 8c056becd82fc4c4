"""Random secrets shared by every server of one database, created once by the first."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from server.domain.errors import StartupError
from server.store.models import ServiceSecret, utcnow

PAGE_TOKENS = "page_tokens"
_TABLE = ServiceSecret.__table__


async def shared_secret(engine: AsyncEngine, name: str, size: int = 32) -> bytes:
    """The secret ``name`` of this database: the stored one, or a new random one stored now.

    Servers starting at once agree: each offers a random value with ``INSERT ... ON
    CONFLICT DO NOTHING`` and then reads back the one that was stored first (on
    PostgreSQL the second insert waits for the first transaction and then does nothing).

    Raises:
        StartupError: the stored value is not one this function could have written.
    """
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    offer = dialect.insert(_TABLE).values(
        name=name, value=secrets.token_bytes(size), created_at=utcnow()
    )
    async with engine.begin() as conn:
        await conn.execute(offer.on_conflict_do_nothing(index_elements=["name"]))
        stored = await conn.scalar(select(_TABLE.c.value).where(_TABLE.c.name == name))
    if not isinstance(stored, bytes) or len(stored) < size:
        raise StartupError(f"the stored secret {name!r} is not a value of {size}+ bytes")
    return stored
