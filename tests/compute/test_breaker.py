"""The circuit breakers and the retry policy, with a controlled clock."""

from __future__ import annotations

import random

import pytest

from server.compute.base import ComputeError
from server.compute.breaker import Breakers, BreakerSettings, BreakerState, CircuitBreaker
from server.compute.retry import Backoff, RetryPolicy
from server.config import ComputeSettings
from server.domain.enums import ComputeErrorCategory


def _state(breaker: CircuitBreaker) -> BreakerState:
    """The state, read through a call so that mypy does not narrow it between calls."""
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


async def _fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        with pytest.raises(ComputeError):
            await breaker.call(Backend().call)


async def _succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    backend = Backend()
    backend.down = False
    for _ in range(times):
        await breaker.call(backend.call)


SMALL = BreakerSettings(window_s=10.0, min_calls=4, failure_rate=0.5, open_s=5.0)


async def test_it_opens_fails_fast_tries_once_and_closes() -> None:
    clock, backend = Clock(), Backend()
    told: list[BreakerState] = []
    breaker = CircuitBreaker("status", SMALL, clock=clock)
    breaker.listen(lambda b: told.append(b.state))
    for _ in range(4):
        with pytest.raises(ComputeError):
            await breaker.call(backend.call)
    assert breaker.state is BreakerState.OPEN
    assert told == [BreakerState.OPEN]
    for _ in range(10):  # open: the backend is not called at all
        with pytest.raises(ComputeError, match="circuit open"):
            await breaker.call(backend.call)
    assert backend.calls == 4
    clock.now = 5.0
    with pytest.raises(ComputeError, match="refused"):  # the one trial call
        await breaker.call(backend.call)
    assert backend.calls == 5
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(ComputeError, match="circuit open"):
        await breaker.call(backend.call)
    clock.now = 10.0
    backend.down = False
    assert await breaker.call(backend.call) == "ok"
    assert _state(breaker) is BreakerState.CLOSED
    assert told == [BreakerState.OPEN, BreakerState.CLOSED]
    assert breaker.counts == (0, 0)  # closing starts an empty window
    assert breaker.times_opened == 1


async def test_it_needs_the_minimum_number_of_calls_before_it_can_open() -> None:
    breaker = CircuitBreaker("submit", SMALL, clock=Clock())
    await _fail(breaker, 3)
    assert breaker.state is BreakerState.CLOSED  # 3 of 3 failed, but 3 < min_calls
    await _fail(breaker)
    assert _state(breaker) is BreakerState.OPEN


async def test_it_opens_on_the_failure_rate_not_on_failures_in_a_row() -> None:
    breaker = CircuitBreaker("status", SMALL, clock=Clock())
    # Alternating: never two failures in a row, yet half of the calls fail.
    for _ in range(2):
        await _succeed(breaker)
        await _fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert breaker.counts == (4, 2)


async def test_failures_below_the_rate_never_open_it() -> None:
    breaker = CircuitBreaker("status", SMALL, clock=Clock())
    for _ in range(50):  # a third failing, in runs of two
        await _succeed(breaker, 4)
        await _fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED


async def test_old_calls_leave_the_window() -> None:
    clock = Clock()
    breaker = CircuitBreaker("status", SMALL, clock=clock)
    await _fail(breaker, 3)
    clock.now = 10.5  # past the window: those failures no longer count
    await _succeed(breaker, 3)
    await _fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.counts == (4, 1)


async def test_thirty_percent_random_faults_never_open_the_default_breaker() -> None:
    """The defaults of ``SARTIQ_COMPUTE__BREAKER_*``, 20,000 calls at a call every 50 ms."""
    c = ComputeSettings()
    settings = BreakerSettings(
        window_s=c.breaker_window,
        min_calls=c.breaker_min_calls,
        failure_rate=c.breaker_failure_rate,
        open_s=c.breaker_reset,
    )
    clock, rng = Clock(), random.Random(15)
    breaker = CircuitBreaker("status", settings, clock=clock)
    longest_run = run = 0
    for _ in range(20_000):
        clock.now += 0.05
        if rng.random() < 0.3:
            run += 1
            longest_run = max(longest_run, run)
            await _fail(breaker)
        else:
            run = 0
            await _succeed(breaker)
    assert breaker.times_opened == 0
    assert longest_run >= 5  # runs of failures in a row happened, and did not open it


async def test_a_dead_backend_opens_the_default_breaker() -> None:
    clock = Clock()
    breaker = CircuitBreaker("status", BreakerSettings(), clock=clock)
    for _ in range(100):
        clock.now += 0.1
        if breaker.state is not BreakerState.CLOSED:
            break
        await _fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert breaker.counts[0] == BreakerSettings().min_calls


async def test_a_permanent_answer_proves_the_backend_is_up() -> None:
    breaker = CircuitBreaker("submit", SMALL, clock=Clock())

    async def invalid() -> None:
        raise ComputeError(ComputeErrorCategory.VALIDATION, "bad")

    for _ in range(10):
        await _fail(breaker)
        with pytest.raises(ComputeError):
            await breaker.call(invalid)
    assert breaker.state is BreakerState.OPEN  # half of the calls failed transiently
    breaker = CircuitBreaker("submit", SMALL, clock=Clock())
    for _ in range(10):
        with pytest.raises(ComputeError):
            await breaker.call(invalid)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.counts == (10, 0)


async def test_each_operation_has_its_own_breaker_and_health_sees_them_all() -> None:
    clock = Clock()
    breakers = Breakers(SMALL, clock=clock)
    told: list[bool] = []
    breakers.listen(told.append)
    await _fail(breakers["status"], 4)
    assert breakers["status"].state is BreakerState.OPEN
    assert breakers["submit"].state is BreakerState.CLOSED
    await _succeed(breakers["submit"])  # a submit still goes through
    assert not breakers.healthy
    assert breakers.open_operations == ["status"]
    clock.now = 5.0
    await _succeed(breakers["status"])
    assert breakers.healthy
    assert told == [False, True]


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


async def test_progress_gives_a_long_call_a_fresh_budget() -> None:
    clock = Clock()
    backoff = Backoff(RetryPolicy(base_s=0.1, cap_s=10.0, budget_s=5.0), clock=clock)
    waits = [backoff.next_delay() for _ in range(3)]
    assert waits[2] is not None
    assert 0.2 <= waits[2] <= 0.4  # growing
    clock.now = 4.9
    assert backoff.next_delay() is None  # it would end past the budget: give up
    backoff.reset()  # a snapshot arrived
    first = backoff.next_delay()
    assert first is not None
    assert 0.05 <= first <= 0.1  # the shortest wait again, in a fresh budget


async def test_a_streamed_call_is_counted_once_when_it_ends() -> None:
    clock = Clock()
    breaker = CircuitBreaker("events", SMALL, clock=clock)
    attempt = breaker.attempt()
    attempt.ended()
    attempt.ended(ComputeError(ComputeErrorCategory.TRANSIENT, "late"))  # one verdict only
    assert breaker.counts == (1, 0)
    breaker.attempt().abandoned()  # its caller left: not counted
    assert breaker.counts == (1, 0)
    for _ in range(3):
        breaker.attempt().ended(ComputeError(ComputeErrorCategory.TRANSIENT, "cut"))
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(ComputeError, match="circuit open"):
        breaker.attempt()
    clock.now = 5.0
    trial = breaker.attempt()
    with pytest.raises(ComputeError, match="circuit open"):
        breaker.attempt()  # one trial at a time
    trial.abandoned()
    breaker.attempt().ended()  # the next one tries, and closes it
    assert breaker.counts == (0, 0)  # closed: an empty window
    breaker.attempt().ended()  # and calls go through


async def test_an_open_events_circuit_leaves_the_backend_healthy() -> None:
    breakers = Breakers(SMALL, clock=Clock())
    for _ in range(4):
        breakers["events"].attempt().ended(ComputeError(ComputeErrorCategory.TRANSIENT, "cut"))
    assert breakers["events"].state is BreakerState.OPEN
    assert breakers.healthy  # polling takes over
    assert breakers.open_operations == ["events"]
