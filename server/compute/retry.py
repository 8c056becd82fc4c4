"""One retry policy for every compute call: capped, jittered exponential backoff in a budget.

Only transient errors (``ComputeError.transient``: TRANSIENT or CAPACITY) are retried;
any other error, and the last transient one once the budget is spent, is raised.
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
        budget_s: how long one call may keep retrying, from its first try.
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
    ) -> T:
        """Run ``operation`` until it succeeds or fails permanently or the budget is spent.

        Args:
            operation: the call, made again for each try.
            sleep: how to wait between tries (e.g. raced against a stop token).
            on_retry: told of each transient failure and the wait before the next try.

        Raises:
            ComputeError: a permanent failure, or the last transient one.
        """
        deadline = time.monotonic() + self.budget_s
        delays = self.delays()
        while True:
            try:
                return await operation()
            except ComputeError as exc:
                delay = next(delays)
                if not exc.transient or time.monotonic() + delay > deadline:
                    raise
                if on_retry is not None:
                    on_retry(exc, delay)
                await sleep(delay)
