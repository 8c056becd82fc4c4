"""The circuit breaker and the retry policy, with a controlled clock."""

from __future__ import annotations

import pytest

from server.compute.base import ComputeError
from server.compute.breaker import BreakerState, CircuitBreaker
from server.compute.retry import RetryPolicy
from server.domain.enums import ComputeErrorCategory


def _state(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Backend:
    """Counts calls; fails transiently while ``down``."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = True

    async def call(self) -> str:
        self.calls += 1
        if self.down:
            raise ComputeError(ComputeErrorCategory.TRANSIENT, "refused")
        return "ok"


async def test_it_opens_fails_fast_tries_once_and_closes() -> None:
    clock, backend = Clock(), Backend()
    told: list[bool] = []
    breaker = CircuitBreaker(threshold=3, reset_s=5.0, clock=clock)
    breaker.listen(told.append)
    for _ in range(3):
        with pytest.raises(ComputeError):
            await breaker.call(backend.call)
    assert breaker.state is BreakerState.OPEN
    assert told == [False]
    for _ in range(10):  # open: the backend is not called at all
        with pytest.raises(ComputeError, match="circuit open"):
            await breaker.call(backend.call)
    assert backend.calls == 3
    clock.now = 5.0
    with pytest.raises(ComputeError, match="refused"):  # the one trial call
        await breaker.call(backend.call)
    assert backend.calls == 4
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(ComputeError, match="circuit open"):
        await breaker.call(backend.call)
    clock.now = 10.0
    backend.down = False
    assert await breaker.call(backend.call) == "ok"
    assert _state(breaker) is BreakerState.CLOSED
    assert told == [False, True]


async def test_a_permanent_answer_proves_the_backend_is_up() -> None:
    breaker = CircuitBreaker(threshold=2, reset_s=5.0, clock=Clock())

    async def refused() -> None:
        raise ComputeError(ComputeErrorCategory.TRANSIENT, "refused")

    async def invalid() -> None:
        raise ComputeError(ComputeErrorCategory.VALIDATION, "bad")

    with pytest.raises(ComputeError):
        await breaker.call(refused)
    with pytest.raises(ComputeError):
        await breaker.call(invalid)
    with pytest.raises(ComputeError):
        await breaker.call(refused)
    assert breaker.state is BreakerState.CLOSED  # the count restarted after "bad"


async def test_the_retry_policy_retries_transient_errors_within_its_budget() -> None:
    backend = Backend()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            backend.down = False

    policy = RetryPolicy(base_s=0.1, cap_s=0.3, budget_s=60)
    assert await policy.call(backend.call, sleep=sleep) == "ok"
    assert backend.calls == 4
    assert 0.05 <= waits[0] <= 0.1
    assert 0.15 <= waits[2] <= 0.3  # capped

    async def bad() -> None:
        raise ComputeError(ComputeErrorCategory.VALIDATION, "bad")

    with pytest.raises(ComputeError, match="bad"):
        await policy.call(bad, sleep=sleep)
    assert len(waits) == 3  # a permanent error is not retried


async def test_the_retry_budget_ends_the_retries() -> None:
    backend = Backend()

    async def sleep(seconds: float) -> None:
        return None

    with pytest.raises(ComputeError, match="refused"):
        await RetryPolicy(base_s=0.4, cap_s=0.4, budget_s=0.1).call(backend.call, sleep=sleep)
    assert backend.calls == 1
