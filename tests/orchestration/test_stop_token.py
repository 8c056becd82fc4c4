"""The stop token's waits: abandoned when it is set, never left half-made."""

from __future__ import annotations

import asyncio
import gc

import pytest

from server.orchestration.live import Stop, Stopped, StopToken


async def test_a_wait_raced_against_a_set_token_is_closed_not_left_unawaited() -> None:
    """The backoff of a cancelled generation: no coroutine is left "never awaited"."""
    token = StopToken()
    token.stop(Stop.CANCELLED)
    with pytest.raises(Stopped):
        await token.sleep(10.0)
    with pytest.raises(Stopped):
        await token.race(asyncio.sleep(10.0))
    gc.collect()  # an unawaited coroutine would warn here, and warnings are errors


async def test_a_wait_is_cancelled_when_the_token_is_set() -> None:
    token = StopToken()
    asyncio.get_running_loop().call_later(0.01, token.stop, Stop.DEADLINE_EXCEEDED)
    with pytest.raises(Stopped) as stopped:
        await token.sleep(10.0)
    assert stopped.value.reason is Stop.DEADLINE_EXCEEDED
