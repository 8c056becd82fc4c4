"""Circuit breakers in front of a remote backend: stop hammering it while it is down.

One breaker per operation (submit, status, events, download, cancel, lookup,
evaluation), so a fault in one kind of call does not stop the others. A breaker counts
calls and transient failures over a sliding time window (``window_s``, in ten buckets);
it opens only once the window holds at least ``min_calls`` calls and ``failure_rate`` of
them failed. Partial faults (a third of the calls failing at random) therefore never open
it, while a server that is down does, once there is traffic enough to tell. A streamed
call (a task's events) is one call, counted when its stream ends (``Attempt``).

Closed: calls go through. Open: calls fail at once with a transient error (callers back
off, within their retry budget) until ``open_s`` passed. Then one trial call goes through
(half-open): its success closes the breaker with an empty window, its failure opens it
again. A permanent answer (4xx) proves the server up and counts as a success.

``Breakers`` holds one per operation and tells its listeners whether all are closed, so
the health service can report the degradation. An operation with a fallback (the events
stream, which polling replaces) is left out of that: its circuit open only means polling.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from server.compute.base import ComputeError
from server.domain.enums import ComputeErrorCategory

T = TypeVar("T")
_BUCKETS = 10
# Operations whose calls have a fallback: their circuit open leaves the backend healthy.
WITH_FALLBACK = frozenset({"events"})


class BreakerState(StrEnum):
    """Where a breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When a breaker opens and for how long (``SARTIQ_COMPUTE__BREAKER_*``)."""

    window_s: float = 30.0
    min_calls: int = 40
    failure_rate: float = 0.5
    open_s: float = 5.0


class CircuitBreaker:
    """A failure-rate breaker for one operation; event-loop only."""

    def __init__(
        self,
        name: str = "compute",
        settings: BreakerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._bucket_s = self.settings.window_s / _BUCKETS
        # (bucket number, calls, failures), oldest first.
        self._window: deque[list[int]] = deque()
        self._opened_at = 0.0
        self._trial = False
        self.state = BreakerState.CLOSED
        self.times_opened = 0
        self._listeners: list[Callable[[CircuitBreaker], None]] = []

    def listen(self, listener: Callable[[CircuitBreaker], None]) -> None:
        """Call ``listener(breaker)`` whenever the breaker opens or closes."""
        self._listeners.append(listener)

    @property
    def counts(self) -> tuple[int, int]:
        """(calls, failures) in the current window."""
        self._expire()
        return sum(b[1] for b in self._window), sum(b[2] for b in self._window)

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` through the breaker.

        Raises:
            ComputeError: transient, at once, while open; else whatever the call raised.
        """
        attempt = self.attempt()
        try:
            result = await operation()
        except ComputeError as exc:
            attempt.ended(exc)
            raise
        except BaseException:
            attempt.abandoned()  # cancelled or a bug: no verdict
            raise
        attempt.ended()
        return result

    def attempt(self) -> Attempt:
        """Let one call through, its verdict to be given when it ends (a streamed call).

        Raises:
            ComputeError: transient, at once, while open.
        """
        return Attempt(self, self._admit())

    def _admit(self) -> bool:
        """Let a call through (True: it is the half-open trial) or refuse it."""
        if self.state is BreakerState.CLOSED:
            return False
        waited = self._clock() - self._opened_at
        if self.state is BreakerState.OPEN and waited >= self.settings.open_s:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN and not self._trial:
            self._trial = True
            return True
        wait = max(0.0, self.settings.open_s - waited)
        raise ComputeError(
            ComputeErrorCategory.TRANSIENT,
            f"compute {self.name} calls suspended (circuit open; next trial in {wait:.1f} s)",
        )

    def _record(self, *, failed: bool, trial: bool) -> None:
        if trial:
            self._trial = False
            if failed:
                self._open()
            else:
                self._close()
            return
        if self.state is not BreakerState.CLOSED:
            return  # admitted before the breaker opened: the trial decides now
        self._expire()
        number = int(self._clock() // self._bucket_s)
        if not self._window or self._window[-1][0] != number:
            self._window.append([number, 0, 0])
        self._window[-1][1] += 1
        self._window[-1][2] += int(failed)
        if failed:
            calls, failures = self.counts
            s = self.settings
            if calls >= s.min_calls and failures >= s.failure_rate * calls:
                self._open()

    def _expire(self) -> None:
        oldest = int(self._clock() // self._bucket_s) - _BUCKETS + 1
        while self._window and self._window[0][0] < oldest:
            self._window.popleft()

    def _open(self) -> None:
        was_closed = self.state is BreakerState.CLOSED
        self.state = BreakerState.OPEN
        self._opened_at = self._clock()
        if was_closed:
            self.times_opened += 1
            self._tell()

    def _close(self) -> None:
        self.state = BreakerState.CLOSED
        self._window.clear()
        self._tell()

    def _tell(self) -> None:
        for listener in self._listeners:
            listener(self)


class Attempt:
    """One call let through a breaker; its verdict is given once, when the call ends.

    ``call`` gives it around one awaited operation; a streamed call (the task events)
    holds it for the stream's life: ``ended()`` when it ends as it should, ``ended(error)``
    when it fails, ``abandoned()`` when its caller leaves before either (no verdict).
    """

    def __init__(self, breaker: CircuitBreaker, trial: bool) -> None:
        self._breaker = breaker
        self._trial = trial
        self._open = True

    def ended(self, error: ComputeError | None = None) -> None:
        """Count the call: failed when ``error`` is transient (a 4xx proves the server up)."""
        if self._open:
            self._open = False
            self._breaker._record(failed=error is not None and error.transient, trial=self._trial)

    def abandoned(self) -> None:
        """No verdict: the call is not counted; a half-open breaker lets the next one try."""
        if self._open:
            self._open = False
            if self._trial:
                self._breaker._trial = False


class Breakers:
    """One breaker per operation of a remote backend, made on first use."""

    def __init__(
        self,
        settings: BreakerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
        self._listeners: list[Callable[[bool], None]] = []

    def __getitem__(self, operation: str) -> CircuitBreaker:
        breaker = self._breakers.get(operation)
        if breaker is None:
            breaker = CircuitBreaker(operation, self.settings, clock=self._clock)
            breaker.listen(lambda _: self._tell())
            self._breakers[operation] = breaker
        return breaker

    @property
    def healthy(self) -> bool:
        """Whether every breaker is closed (those of ``WITH_FALLBACK`` aside)."""
        return all(
            b.state is BreakerState.CLOSED
            for name, b in self._breakers.items()
            if name not in WITH_FALLBACK
        )

    @property
    def open_operations(self) -> list[str]:
        """The operations whose breaker is not closed."""
        return sorted(n for n, b in self._breakers.items() if b.state is not BreakerState.CLOSED)

    def listen(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(healthy)`` whenever any breaker opens or closes."""
        self._listeners.append(listener)

    def _tell(self) -> None:
        healthy = self.healthy
        for listener in self._listeners:
            listener(healthy)
