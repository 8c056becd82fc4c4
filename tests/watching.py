"""Watch streams read in the background, every item noted with when it arrived."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from server.domain.events import GenerationEvent
from server.store.events import EventBus


class Stream:
    """Reads a WatchGeneration or WatchGenerations call until it ends or is cancelled."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.items: list[tuple[float, Any]] = []  # (time.monotonic() on arrival, item)
        self.ended = False
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for item in self.call:
            self.items.append((time.monotonic(), item))
        self.ended = True

    async def stop(self) -> None:
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    def events(self) -> list[Any]:
        return [item.event for _, item in self.items if item.HasField("event")]

    def heartbeats(self) -> int:
        return sum(1 for _, item in self.items if item.HasField("heartbeat"))

    def arrival(self, picked: Callable[[Any], bool]) -> float | None:
        """When the first event ``picked`` chooses arrived, or None."""
        for when, item in self.items:
            if item.HasField("event") and picked(item.event):
                return when
        return None

    def heartbeats_between(self, start: float, end: float) -> int:
        return sum(
            1 for when, item in self.items if item.HasField("heartbeat") and start <= when <= end
        )


class TimedBus(EventBus):
    """Notes when each event was published, i.e. right after its commit (in-process apps)."""

    def __init__(self) -> None:
        super().__init__()
        self.published: dict[tuple[str, int], float] = {}
        self.wakes: list[Any] = []

    def publish(self, events: Iterable[GenerationEvent]) -> None:
        events = list(events)
        now = time.monotonic()
        for event in events:
            self.published[(event.generation_id, event.sequence)] = now
        super().publish(events)

    def wake(self, organizations: Any) -> None:
        self.wakes.append(organizations)
        super().wake(organizations)


def percentile(values: list[float], share: float) -> float:
    """The value below which ``share`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]
