"""WatchGeneration: replay stored events after a cursor, then tail live ones, gap-free."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime

from server.domain.enums import GenerationStatus
from server.domain.errors import UnavailableError, Violations
from server.domain.events import GenerationEvent
from server.domain.states import GENERATION_TERMINAL
from server.orchestration.service import generation_not_found
from server.store import repository
from server.store.events import BusClosedError, LaggedError, Subscription
from server.store.models import utcnow
from server.store.uow import Store

REPLAY_BATCH = 100
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Sent when nothing happened for a while, to keep idle streams alive."""

    time: datetime


class Watcher:
    """Streams one generation's events to one subscriber."""

    def __init__(self, store: Store, *, heartbeat_interval: float) -> None:
        self._store = store
        self._heartbeat_interval = heartbeat_interval

    async def watch(
        self, org: str, generation_id: str, after_sequence: int
    ) -> AsyncGenerator[GenerationEvent | Heartbeat, None]:
        """Yield events with sequence > ``after_sequence``; end after the terminal one.

        Raises:
            NotFoundError: unknown id, or another organization's.
            InvalidArgumentError: the cursor is negative or beyond the last event.
            UnavailableError: the server is shutting down; resume elsewhere from the cursor.
        """
        subscription = self._store.bus.subscribe(generation_id)
        try:
            # Only the position: a long-lived stream must not pin the generation's tree.
            async with self._store.read() as session:
                position = await repository.generation_position(session, org, generation_id)
            if position is None:
                raise generation_not_found(generation_id)
            status, last_sequence = position
            v = Violations()
            if not 0 <= after_sequence <= last_sequence:
                v.add("after_sequence", f"must be between 0 and {last_sequence}")
            v.raise_if_any()
            if GenerationStatus(status) in GENERATION_TERMINAL and after_sequence == last_sequence:
                return
            last = after_sequence
            while True:
                async with contextlib.aclosing(self._replay(generation_id, last)) as replay:
                    async for event in replay:
                        yield event
                        last = event.sequence
                        if event.terminal:
                            return
                try:
                    async with contextlib.aclosing(self._tail(subscription, last)) as tail:
                        async for item in tail:
                            yield item
                            if isinstance(item, GenerationEvent):
                                last = item.sequence
                                if item.terminal:
                                    return
                except LaggedError:
                    log.debug("watcher of %s fell behind; resuming from the store", generation_id)
                    continue
                except BusClosedError:
                    raise UnavailableError(
                        f"the server is shutting down; resume with after_sequence={last}",
                        retry_after=1.0,
                    ) from None
        finally:
            subscription.close()

    async def _replay(
        self, generation_id: str, after: int
    ) -> AsyncGenerator[GenerationEvent, None]:
        while True:
            async with self._store.read() as session:
                batch = await repository.events_after(session, generation_id, after, REPLAY_BATCH)
            for event in batch:
                yield event
                after = event.sequence
            if len(batch) < REPLAY_BATCH:
                return

    async def _tail(
        self, subscription: Subscription, last: int
    ) -> AsyncGenerator[GenerationEvent | Heartbeat, None]:
        while True:
            event = await subscription.next(self._heartbeat_interval)
            if event is None:
                yield Heartbeat(utcnow())
            elif event.sequence <= last:
                continue  # already replayed from the store
            elif event.sequence > last + 1:
                raise LaggedError  # a gap: resume from the store
            else:
                last = event.sequence
                yield event
