"""Read sessions over the service's engine, and the bus committed events are published on.

Every write goes through ``server.store.writer.Writer``; this side only reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.store.events import EventBus


class Store:
    """Hands out read sessions; ``bus`` carries committed events to watchers."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], bus: EventBus) -> None:
        self._sessions = sessions
        self.bus = bus

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only."""
        async with self._sessions() as session:
            yield session
