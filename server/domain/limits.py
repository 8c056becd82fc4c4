"""Admission limits: the refusals they answer, and the per-organization call rate."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from server.domain.errors import ResourceExhaustedError


@dataclass(frozen=True, slots=True)
class RetryDelay:
    """What a refused create is told to wait (``RetryInfo``), spread around ``seconds``.

    Callers refused together and told the same delay all come back at the same moment,
    and are refused together again: a burst every ``seconds`` that the next refusals
    repeat. Each refusal draws its delay uniformly from ``seconds x (1 +/- jitter)``
    instead, so the callers' returns spread out while the mean wait stays ``seconds``.
    """

    seconds: float
    jitter: float = 0.0

    def draw(self) -> float:
        """One refusal's delay, in seconds."""
        if not self.jitter:
            return self.seconds
        return self.seconds * (1 + self.jitter * random.uniform(-1.0, 1.0))


def queue_full(retry: RetryDelay) -> ResourceExhaustedError:
    """The refusal of a create once the queue bound is reached."""
    return ResourceExhaustedError(
        "too many generations are in progress; retry later", retry_after=retry.draw()
    )


def organization_full(limit: int, retry: RetryDelay) -> ResourceExhaustedError:
    """The refusal of a create once its organization has ``limit`` generations live."""
    return ResourceExhaustedError(
        f"this organization has {limit} generations in progress, its limit; "
        "retry when some have finished",
        retry_after=retry.draw(),
        reason="ORGANIZATION_LIMIT",
    )


class RateLimiter(Protocol):
    """Grants calls per key (an organization) at a rate."""

    async def take(self, key: str) -> float:
        """Take a token for ``key``: 0.0 when granted, else the seconds until one is due."""
        ...


class TokenBuckets:
    """``rate`` tokens per second up to ``burst``, per key; a call takes one token.

    In this process's memory: the limiter of one process (SQLite). Buckets of keys that
    have refilled completely are forgotten, so the memory follows the number of recently
    active organizations.
    """

    def __init__(
        self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    async def take(self, key: str) -> float:
        """Take a token for ``key``: 0.0 when granted, else the seconds until one is due."""
        now = self._clock()
        tokens, at = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self._rate
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > 10_000:
            self._forget_full(now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        full = [
            key
            for key, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self._rate >= self._burst
        ]
        for key in full:
            del self._buckets[key]
