"""Watching: replay stored events after a cursor, then tail live ones, with no gap.

A stream subscribes to live events before it reads anything, then replays what was
committed after its cursor (from the bus's recent logs when the whole log is there, else
from the store), then tails. Events another replica committed arrive as a wake-up that
sends the stream back to the store. And at every heartbeat the stream asks the store
(never the recent logs, which cannot know what they missed) whether anything was
committed past its position, so an event whose publication or wake-up was lost still
arrives within one heartbeat.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime

from server.domain.enums import GenerationStatus
from server.domain.errors import UnavailableError, Violations
from server.domain.events import GenerationEvent
from server.domain.filters import GenerationFilter
from server.domain.recorder import utcnow
from server.domain.states import GENERATION_TERMINAL
from server.orchestration.service import generation_not_found
from server.store import repository
from server.store.events import BusClosedError, LaggedError, Subscription
from server.store.sessions import Store

REPLAY_BATCH = 100
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Sent when nothing happened for a while, to keep idle streams alive.

    ``cursor`` is how far an organization stream has looked (0 on generation streams).
    """

    time: datetime
    cursor: int = 0


class Watcher:
    """Streams the events of one generation, or of an organization's generations."""

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
        subscription = self._store.bus.subscribe(org, generation_id)
        try:
            position = await self._position(org, generation_id)
            if position is not None and after_sequence > position[1]:
                # The recent log may lag another replica's commits: only the store can
                # say that the cursor is beyond the end.
                position = await self._stored_position(org, generation_id)
            if position is None:
                raise generation_not_found(generation_id)
            status, last_sequence = position
            v = Violations()
            if not 0 <= after_sequence <= last_sequence:
                v.add("after_sequence", f"must be between 0 and {last_sequence}")
            v.raise_if_any()
            if status in GENERATION_TERMINAL and after_sequence == last_sequence:
                return
            stream = self._follow(org, generation_id, subscription, after_sequence)
            async with contextlib.aclosing(stream) as items:
                async for item in items:
                    yield item
        finally:
            subscription.close()

    async def _follow(
        self, org: str, generation_id: str, subscription: Subscription, last: int
    ) -> AsyncGenerator[GenerationEvent | Heartbeat, None]:
        while True:
            async with contextlib.aclosing(self._replay(generation_id, last)) as replay:
                async for event in replay:
                    yield event
                    last = subscription.seen = event.sequence
                    if event.terminal:
                        return
            try:
                async with contextlib.aclosing(
                    self._tail(org, generation_id, subscription, last)
                ) as tail:
                    async for item in tail:
                        yield item
                        if isinstance(item, GenerationEvent):
                            last = subscription.seen = item.sequence
                            if item.terminal:
                                return
            except LaggedError:
                log.debug("watcher of %s fell behind; resuming from the store", generation_id)
            except BusClosedError:
                raise UnavailableError(
                    f"the server is shutting down; resume with after_sequence={last}",
                    retry_after=1.0,
                ) from None

    async def _position(self, org: str, generation_id: str) -> tuple[GenerationStatus, int] | None:
        recent = self._store.bus.recent.get(generation_id)
        if recent:
            if recent[0].organization != org:
                return None
            latest = recent[-1]
            return latest.status or GenerationStatus.PENDING, latest.sequence
        return await self._stored_position(org, generation_id)

    async def _stored_position(
        self, org: str, generation_id: str
    ) -> tuple[GenerationStatus, int] | None:
        async with self._store.read() as session:
            stored = await repository.generation_position(session, org, generation_id)
        return None if stored is None else (GenerationStatus(stored[0]), stored[1])

    async def _replay(
        self, generation_id: str, after: int
    ) -> AsyncGenerator[GenerationEvent, None]:
        recent = self._store.bus.recent.get(generation_id)
        if recent and recent[-1].sequence >= after:
            for event in recent[after:]:  # a kept log starts at sequence 1
                yield event
            return
        while True:
            async with self._store.read() as session:
                batch = await repository.events_after(session, generation_id, after, REPLAY_BATCH)
            for event in batch:
                yield event
                after = event.sequence
            if len(batch) < REPLAY_BATCH:
                return

    async def _tail(
        self, org: str, generation_id: str, subscription: Subscription, last: int
    ) -> AsyncGenerator[GenerationEvent | Heartbeat, None]:
        while True:
            event = await subscription.next(self._heartbeat_interval)
            if event is None:
                position = await self._stored_position(org, generation_id)
                if position is not None and position[1] > last:
                    # Committed but never published here (nor woken for): read it, and
                    # not from a recent log that missed it too.
                    self._store.bus.recent.forget(generation_id)
                    raise LaggedError
                yield Heartbeat(utcnow())
            elif event.sequence <= last:
                continue  # already replayed
            elif event.sequence > last + 1:
                raise LaggedError  # a gap: resume from the store
            else:
                last = event.sequence
                yield event

    async def watch_organization(
        self, org: str, flt: GenerationFilter, after_cursor: int
    ) -> AsyncGenerator[GenerationEvent | Heartbeat, None]:
        """Yield the events of ``org`` matching ``flt`` with cursor > ``after_cursor``.

        A negative cursor starts from the events committed after the call. Runs until
        the caller stops reading (or the server shuts down).

        Raises:
            InvalidArgumentError: the cursor is beyond the organization's last event.
            UnavailableError: the server is shutting down; resume from the last cursor.
        """
        subscription = self._store.bus.subscribe_organization(org)
        try:
            latest = await self._latest_cursor(org)
            # Cursors count this organization's events 1, 2, 3...: a larger one was never
            # given out (or predates the renumbering of 0008), and would skip events.
            v = Violations()
            if after_cursor > latest:
                v.add("after_cursor", f"must be between -1 and {latest}, the last cursor")
            v.raise_if_any()
            last = latest if after_cursor < 0 else after_cursor
            while True:
                try:
                    async for item in self._organization_round(org, flt, subscription, last):
                        last = item.cursor
                        yield item
                except LaggedError:
                    continue
                except BusClosedError:
                    raise UnavailableError(
                        f"the server is shutting down; resume with after_cursor={last}",
                        retry_after=1.0,
                    ) from None
        finally:
            subscription.close()

    async def _latest_cursor(self, org: str) -> int:
        async with self._store.read() as session:
            return await repository.latest_cursor(session, org)

    async def _organization_round(
        self, org: str, flt: GenerationFilter, subscription: Subscription, last: int
    ) -> AsyncGenerator[GenerationEvent | Heartbeat, None]:
        """Replay from the store up to now, then tail until a heartbeat finds news there."""
        while True:
            async with self._store.read() as session:
                found, scanned = await repository.organization_events_after(
                    session, org, flt, last, REPLAY_BATCH
                )
            for event in found:
                yield event
            last = scanned
            if len(found) < REPLAY_BATCH:
                break
        while True:
            live = await subscription.next(self._heartbeat_interval)
            if live is None:
                # Anything committed that was neither published nor woken for here?
                async with self._store.read() as session:
                    found, scanned = await repository.organization_events_after(
                        session, org, flt, last, 1
                    )
                if found:
                    raise LaggedError
                last = scanned  # committed, and none of it matches the filter
                yield Heartbeat(utcnow(), cursor=last)
                continue
            if live.cursor <= last:
                continue
            if live.cursor > last + 1:
                # Every event of the organization passes through here in cursor order
                # unless another replica committed some: read those from the store.
                raise LaggedError
            if matches(flt, live):
                yield live
            last = live.cursor


def matches(flt: GenerationFilter, event: GenerationEvent) -> bool:
    """Whether a live event belongs to a stream with filter ``flt``."""
    if flt.statuses and (event.status is None or event.status.value not in flt.statuses):
        return False
    if flt.strategies and (event.strategy is None or event.strategy.value not in flt.strategies):
        return False
    if flt.types and (event.type is None or event.type.value not in flt.types):
        return False
    if any(event.labels.get(k) != v for k, v in flt.labels.items()):
        return False
    created = event.created_at
    if flt.created_after is not None and (created is None or created < flt.created_after):
        return False
    before = flt.created_before
    return before is None or (created is not None and created < before)
