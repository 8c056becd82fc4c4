"""What wakes the lease keeper: kinds collected until read, anything unknown as ANY."""

from __future__ import annotations

from server.store.leases import Wakeups


async def test_kinds_are_collected_until_read_and_unknown_payloads_count_as_any() -> None:
    wakeups = Wakeups()
    assert await wakeups.wait(0.0) == set()  # nothing notified: the keeper's own round
    wakeups.notify(Wakeups.WAITING)
    wakeups.notify(Wakeups.WAITING)
    wakeups.notify("")  # a payload from elsewhere (empty, hostile, a newer release's)
    wakeups.notify('{"kind": "cancel"}')
    assert await wakeups.wait(10.0) == {Wakeups.WAITING, Wakeups.ANY}
    assert await wakeups.wait(0.0) == set()  # read once
