"""A circuit breaker in front of a remote backend: stop hammering it while it is down.

Closed: calls go through; ``threshold`` transient failures in a row open it. Open: calls
fail at once with a transient error (callers back off and wait, in their retry budget)
until ``reset_s`` passed. Then one trial call goes through (half-open): its success
closes the breaker, its failure opens it again. Listeners hear every open/close, so
the health service can report the degradation.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

from server.compute.base import ComputeError
from server.domain.enums import ComputeErrorCategory

T = TypeVar("T")


class BreakerState(StrEnum):
    """Where the breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive transient failures of one backend; event-loop only."""

    def __init__(
        self,
        *,
        threshold: int = 5,
        reset_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = threshold
        self._reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._trial = False
        self.state = BreakerState.CLOSED
        self._listeners: list[Callable[[bool], None]] = []

    def listen(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(healthy)`` whenever the breaker opens (False) or closes (True)."""
        self._listeners.append(listener)

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run ``operation`` through the breaker.

        Raises:
            ComputeError: transient, at once, while open; else whatever the call raised.
        """
        self._admit()
        try:
            result = await operation()
        except ComputeError as exc:
            if exc.transient:
                self._failed()
            else:
                self._succeeded()  # the backend answered: it is up
            raise
        except BaseException:
            self._trial = False
            raise
        self._succeeded()
        return result

    def _admit(self) -> None:
        if self.state is BreakerState.CLOSED:
            return
        if self.state is BreakerState.OPEN and self._clock() - self._opened_at >= self._reset_s:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.HALF_OPEN and not self._trial:
            self._trial = True
            return
        wait = max(0.0, self._reset_s - (self._clock() - self._opened_at))
        raise ComputeError(
            ComputeErrorCategory.TRANSIENT,
            f"compute backend unavailable (circuit open; next trial in {wait:.1f} s)",
        )

    def _failed(self) -> None:
        self._trial = False
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN or self._failures >= self._threshold:
            was_closed = self.state is BreakerState.CLOSED
            self.state = BreakerState.OPEN
            self._opened_at = self._clock()
            if was_closed:
                self._tell(healthy=False)

    def _succeeded(self) -> None:
        self._trial = False
        self._failures = 0
        if self.state is not BreakerState.CLOSED:
            self.state = BreakerState.CLOSED
            self._tell(healthy=True)

    def _tell(self, *, healthy: bool) -> None:
        for listener in self._listeners:
            listener(healthy)
