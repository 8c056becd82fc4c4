"""One retry policy for every compute call: capped, jittered exponential backoff in a budget.

Only transient errors (``ComputeError.transient``: TRANSIENT or CAPACITY) are retried;
any other error, and the last transient one once the budget is spent, is raised. The
budget runs from the first failure; a long call that makes progress (a watch receiving
snapshots) starts over with a fresh budget and the shortest wait (``Backoff.reset``).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from server.compute.base import ComputeError

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff ``base_s`` x 2^n, capped at ``cap_s``, with "equal jitter" (50-100% of it).

    Attributes:
        budget_s: how long one call may keep retrying, from its first failure.
    """

    base_s: float = 0.2
    cap_s: float = 5.0
    budget_s: float = 60.0

    def delays(self) -> Iterator[float]:
        """The successive waits (without end; the budget stops them)."""
        attempt = 0
        while True:
            delay = min(self.cap_s, self.base_s * 2**attempt)
            yield delay * random.uniform(0.5, 1.0)
            attempt += 1

    async def call(
        self,
        operation: Callable[[], Awaitable[T]],
        *,
        sleep: Sleep = asyncio.sleep,
        on_retry: Callable[[ComputeError, float], None] | None = None,
        backoff: Backoff | None = None,
    ) -> T:
        """Run ``operation`` until it succeeds or fails permanently or the budget is spent.

        Args:
            operation: the call, made again for each try.
            sleep: how to wait between tries (e.g. raced against a stop token).
            on_retry: told of each transient failure and the wait before the next try.
            backoff: the state of the waits, for a caller that resets it on progress.

        Raises:
            ComputeError: a permanent failure, or the last transient one.
        """
        backoff = backoff or Backoff(self)
        while True:
            try:
                return await operation()
            except ComputeError as exc:
                delay = backoff.next_delay() if exc.transient else None
                if delay is None:
                    raise
                if on_retry is not None:
                    on_retry(exc, delay)
                await sleep(delay)


class Backoff:
    """The waits of one retried call and the end of its budget."""

    def __init__(self, policy: RetryPolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._clock = clock
        self._delays = policy.delays()
        self._deadline: float | None = None

    def reset(self) -> None:
        """The call made progress: the next failure starts a fresh budget."""
        self._delays = self._policy.delays()
        self._deadline = None

    def next_delay(self) -> float | None:
        """The wait before the next try, or None once it would end past the budget."""
        now = self._clock()
        if self._deadline is None:
            self._deadline = now + self._policy.budget_s
        delay = next(self._delays)
        return None if now + delay > self._deadline else delay
