"""Creates by idempotency key: a duplicate of a create in flight waits for it, never races it.

A retry (the same ``request_id``) must answer with the generation the first request
made, and must not take an admission slot of its own while it finds out. In this process
the first create of a key is its *creator*; duplicates wait for its outcome. Across
processes the database's unique key decides, and the loser reads the winner's row.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from server.domain.errors import AlreadyExistsError
from server.domain.model import Generation

Key = tuple[str, str]  # (organization, request_id)
Stored = Callable[[Key, str], Awaitable[Generation | None]]


class CreatesInFlight:
    """The creates of this process by key, and the keys it committed lately.

    Args:
        stored: reads the generation a key made from the store (checking the digest).
        remember: how many committed keys to remember (see ``claim``).
    """

    def __init__(self, stored: Stored, *, remember: int = 4096) -> None:
        self._stored = stored
        self._creating: dict[Key, asyncio.Future[Generation]] = {}
        self._committed: OrderedDict[Key, None] = OrderedDict()
        self._remember = remember

    async def claim(self, key: Key, digest: str) -> Generation | asyncio.Future[Generation]:
        """The generation ``key`` made, or a future: the caller creates it, then ``settle``s.

        A read of the store that began before a create of this process committed can
        come back empty after it; a key committed here lately is therefore read again
        rather than created a second time.

        Raises:
            AlreadyExistsError: the key was used for a different request.
        """
        read_again = True
        while True:
            existing = await self._existing(key, digest)
            if existing is not None:
                return existing
            if key in self._creating:
                continue  # another began while we read: wait for it
            if key in self._committed and read_again:
                read_again = False
                continue
            creating: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
            creating.add_done_callback(_retrieve)
            self._creating[key] = creating
            return creating

    def settle(
        self,
        key: Key,
        creating: asyncio.Future[Generation],
        *,
        result: Generation | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Record how the create of ``key`` ended and tell the duplicates waiting on it."""
        if self._creating.get(key) is creating:
            del self._creating[key]
        if result is not None:
            self._committed[key] = None
            if len(self._committed) > self._remember:
                self._committed.popitem(last=False)
            creating.set_result(result)
        elif isinstance(error, Exception):
            creating.set_exception(error)
        else:  # cancelled: a waiting duplicate tries for itself
            creating.set_exception(RuntimeError("the first create of this request_id stopped"))

    async def _existing(self, key: Key, digest: str) -> Generation | None:
        creating = self._creating.get(key)
        if creating is not None:
            try:
                first = await asyncio.shield(creating)
            except Exception:
                first = None  # the first attempt failed: this one tries afresh
            if first is not None:
                return same_request(first, key[1], digest)
        return await self._stored(key, digest)


def same_request(generation: Generation, request_id: str, digest: str) -> Generation:
    """``generation``, if the request that made it had this digest.

    Raises:
        AlreadyExistsError: it was made by a different request.
    """
    if generation.fingerprint != digest:
        raise AlreadyExistsError(
            "request_id was used for a different request", request_id=request_id
        )
    return generation


def _retrieve(future: asyncio.Future[Generation]) -> None:
    """Mark a failed create's error as seen: its own caller has it already."""
    if not future.cancelled():
        future.exception()
