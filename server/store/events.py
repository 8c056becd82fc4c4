"""Committed generation events and their in-process fan-out to watchers."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable

from server.domain.events import GenerationEvent


class LaggedError(Exception):
    """The subscriber fell too far behind; it must resume from the store."""


class BusClosedError(Exception):
    """The process is shutting down; the subscriber should reconnect elsewhere."""


class Subscription:
    """A bounded buffer of live events for one watcher of one generation."""

    def __init__(self, bus: EventBus, generation_id: str, maxsize: int) -> None:
        self._bus = bus
        self.generation_id = generation_id
        self._items: deque[GenerationEvent] = deque()
        self._maxsize = maxsize
        self._wakeup = asyncio.Event()
        self._lagged = False
        self._closed = bus.closed

    def push(self, event: GenerationEvent) -> None:
        """Buffer ``event``; on overflow drop the buffer and flag the lag instead."""
        if len(self._items) >= self._maxsize:
            self._items.clear()
            self._lagged = True
        else:
            self._items.append(event)
        self._wakeup.set()

    async def next(self, timeout: float) -> GenerationEvent | None:  # noqa: ASYNC109
        """Wait up to ``timeout`` seconds for the next event; None when none came.

        Raises:
            LaggedError: events were dropped since the last call.
            BusClosedError: the bus was closed for shutdown.
        """
        while not self._items and not self._lagged and not self._closed:
            self._wakeup.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                return None
        if self._closed:
            raise BusClosedError
        if self._lagged:
            self._lagged = False
            raise LaggedError
        return self._items.popleft()

    def close(self) -> None:
        """Stop receiving events."""
        self._bus.unsubscribe(self)

    def shut(self) -> None:
        """End the subscription because the process is shutting down."""
        self._closed = True
        self._wakeup.set()


class EventBus:
    """Fans committed events out to the subscribers of their generation.

    It never blocks a publisher: a subscriber whose buffer is full is flagged as lagged
    and resumes from the event store.
    """

    def __init__(self, buffer_size: int = 256) -> None:
        self._buffer_size = buffer_size
        self._subscribers: dict[str, set[Subscription]] = {}
        self.closed = False

    def close(self) -> None:
        """Wake every subscriber with BusClosedError, now and for later subscriptions."""
        self.closed = True
        for subs in self._subscribers.values():
            for sub in subs:
                sub.shut()

    def subscribe(self, generation_id: str) -> Subscription:
        """Start buffering the live events of ``generation_id``."""
        sub = Subscription(self, generation_id, self._buffer_size)
        self._subscribers.setdefault(generation_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget ``sub``; idempotent."""
        subs = self._subscribers.get(sub.generation_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subscribers[sub.generation_id]

    def publish(self, events: Iterable[GenerationEvent]) -> None:
        """Deliver committed events to every subscriber of their generation."""
        for event in events:
            for sub in self._subscribers.get(event.generation_id, ()):
                sub.push(event)

    def subscriber_count(self, generation_id: str) -> int:
        """How many watchers follow ``generation_id`` on this process."""
        return len(self._subscribers.get(generation_id, ()))
