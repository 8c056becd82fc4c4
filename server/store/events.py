"""Committed generation events and their in-process fan-out to watchers.

Events committed here are published here; events another replica committed reach this
process only as a wake-up (``EventBus.wake``, from the PostgreSQL listener), after which
the watchers concerned read them from the store.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping

from server.domain.events import GenerationEvent


class LaggedError(Exception):
    """The subscriber fell too far behind; it must resume from the store."""


class BusClosedError(Exception):
    """The process is shutting down; the subscriber should reconnect elsewhere."""


class Subscription:
    """A bounded buffer of live events for one watcher of a generation or an organization."""

    def __init__(
        self, bus: EventBus, organization: str, generation_id: str | None, maxsize: int
    ) -> None:
        self._bus = bus
        self.organization = organization
        # The generation followed; None for a stream of the whole organization.
        self.generation_id = generation_id
        # The last sequence the watcher of a generation has delivered (it keeps this
        # up to date), so a wake-up about events it already read costs nothing.
        self.seen = 0
        self._items: deque[GenerationEvent] = deque()
        self._maxsize = maxsize
        self._wakeup = asyncio.Event()
        self._lagged = False
        self._closed = bus.closed

    def push(self, event: GenerationEvent) -> None:
        """Buffer ``event``; on overflow drop the buffer and flag the lag instead."""
        if len(self._items) >= self._maxsize:
            self.fall_behind()
            return
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

    def fall_behind(self) -> None:
        """Make the next ``next`` raise LaggedError: the watcher must read the store."""
        self._items.clear()
        self._lagged = True
        self._wakeup.set()

    def close(self) -> None:
        """Stop receiving events."""
        self._bus.unsubscribe(self)

    def shut(self) -> None:
        """End the subscription because the process is shutting down."""
        self._closed = True
        self._wakeup.set()


class RecentLogs:
    """Whole event logs of the generations that changed last, to replay without a query.

    A log is kept only while it is complete from sequence 1; one that grows past
    ``max_events`` is dropped (its watchers read the store), and the least recently
    changed go first once ``max_generations`` are kept.
    """

    def __init__(self, *, max_generations: int = 2000, max_events: int = 200) -> None:
        self._logs: OrderedDict[str, list[GenerationEvent]] = OrderedDict()
        self._max_generations = max_generations
        self._max_events = max_events

    def record(self, event: GenerationEvent) -> None:
        """Append a committed event to its generation's log, or start one at sequence 1."""
        log = self._logs.get(event.generation_id)
        if event.sequence == 1:
            self._logs[event.generation_id] = [event]
        elif log is not None and log[-1].sequence == event.sequence - 1:
            if len(log) >= self._max_events:
                del self._logs[event.generation_id]
                return
            log.append(event)
            self._logs.move_to_end(event.generation_id)
        else:
            self._logs.pop(event.generation_id, None)
            return
        while len(self._logs) > self._max_generations:
            self._logs.popitem(last=False)

    def get(self, generation_id: str) -> list[GenerationEvent] | None:
        """The whole log of ``generation_id`` if it is kept, else None."""
        return self._logs.get(generation_id)

    def forget(self, generation_id: str) -> None:
        """Drop the log of ``generation_id``: it may lack events committed elsewhere."""
        self._logs.pop(generation_id, None)

    def forget_organization(self, organization: str | None) -> None:
        """Drop the logs of ``organization``'s generations (every log when None)."""
        if organization is None:
            self._logs.clear()
            return
        stale = [k for k, log in self._logs.items() if log[0].organization == organization]
        for generation_id in stale:
            del self._logs[generation_id]


class EventBus:
    """Fans committed events out to the subscribers of their generation or organization.

    It never blocks a publisher: a subscriber whose buffer is full is flagged as lagged
    and resumes from the event store. It also keeps the recent logs watchers replay.
    """

    def __init__(self, buffer_size: int = 256, *, recent: RecentLogs | None = None) -> None:
        self._buffer_size = buffer_size
        self._subscribers: dict[str, set[Subscription]] = {}
        self._organizations: dict[str, set[Subscription]] = {}
        self.recent = recent or RecentLogs()
        self.closed = False

    def close(self) -> None:
        """Wake every subscriber with BusClosedError, now and for later subscriptions."""
        self.closed = True
        for group in (self._subscribers, self._organizations):
            for subs in group.values():
                for sub in subs:
                    sub.shut()

    def subscribe(self, organization: str, generation_id: str) -> Subscription:
        """Start buffering the live events of ``generation_id`` (of ``organization``)."""
        sub = Subscription(self, organization, generation_id, self._buffer_size)
        self._subscribers.setdefault(generation_id, set()).add(sub)
        return sub

    def subscribe_organization(self, organization: str) -> Subscription:
        """Start buffering the live events of every generation of ``organization``."""
        sub = Subscription(self, organization, None, self._buffer_size)
        self._organizations.setdefault(organization, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forget ``sub``; idempotent."""
        if sub.generation_id is None:
            group, key = self._organizations, sub.organization
        else:
            group, key = self._subscribers, sub.generation_id
        subs = group.get(key)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del group[key]

    def wake(self, organizations: Mapping[str, Mapping[str, int] | None] | None) -> None:
        """Another replica committed events: the watchers concerned must read the store.

        Args:
            organizations: per organization, the generations changed and the last
                sequence committed for each, or None for any of its generations; None
                for anything at all (a hint too large to name them, or hints missed).
        """
        if organizations is None:
            self.recent.forget_organization(None)
            for group in (self._subscribers, self._organizations):
                for subs in group.values():
                    for sub in subs:
                        sub.fall_behind()
            return
        for organization, generations in organizations.items():
            for sub in self._organizations.get(organization, ()):
                sub.fall_behind()
            if generations is None:
                self.recent.forget_organization(organization)
                for subs in self._subscribers.values():
                    for sub in subs:
                        if sub.organization == organization:
                            sub.fall_behind()
                continue
            for generation_id, sequence in generations.items():
                self.recent.forget(generation_id)
                for sub in self._subscribers.get(generation_id, ()):
                    if sub.organization == organization and sub.seen < sequence:
                        sub.fall_behind()

    def publish(self, events: Iterable[GenerationEvent]) -> None:
        """Deliver committed events to every subscriber of their generation and org."""
        for event in events:
            self.recent.record(event)
            for sub in self._subscribers.get(event.generation_id, ()):
                sub.push(event)
            for sub in self._organizations.get(event.organization, ()):
                sub.push(event)

    def subscriber_count(self, generation_id: str) -> int:
        """How many watchers follow ``generation_id`` on this process."""
        return len(self._subscribers.get(generation_id, ()))
