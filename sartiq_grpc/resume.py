"""Server streams that survive a server going away: wait, reconnect, resume from a position."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from sartiq_grpc import errors

# Codes after which a watch reconnects and resumes: the server went away or is
# shutting down, or the connection was cut (also at the server's maximum connection
# age: UNAVAILABLE "max connection age" once the GOAWAY's grace has run out).
RESUMABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


async def resuming(
    connect: Callable[[float], Awaitable[None]],
    open_stream: Callable[[int], Any],
    start: int,
    position: Callable[[Any], int | None],
    resume_for: float,
    on_wait: Callable[[str], None] | None,
) -> AsyncIterator[Any]:
    """Items of a stream, reopened from the last position whenever it breaks.

    Each (re)open first waits for a connection with ``connect(seconds)``, bounded by
    what is left of ``resume_for`` since the last item: a stream opened with
    ``wait_for_ready`` and no deadline would wait for an absent server for ever.
    ``on_wait`` hears why, each time the stream broke and reconnecting begins.

    Raises:
        ApiError: the stream ended with a status that reconnecting cannot help.
        TransportError: no item arrived for ``resume_for`` seconds.
    """
    last = start
    delay = 0.1
    deadline = time.monotonic() + resume_for
    why = ""
    while True:
        try:
            await connect(max(deadline - time.monotonic(), 0.0))
        except errors.TransportError as error:
            raise errors.TransportError(
                f"the server stayed unreachable for {resume_for:g} s: {why or error}"
            ) from None
        try:
            async for item in open_stream(last):
                moved = position(item)
                if moved is not None:
                    last = moved
                deadline = time.monotonic() + resume_for
                delay = 0.1
                yield item
            return  # the server ended the stream normally
        except grpc.aio.AioRpcError as error:
            if error.code() not in RESUMABLE:
                raise errors.from_rpc_error(error) from None
            why = error.details() or error.code().name
        if on_wait is not None:
            left = max(deadline - time.monotonic(), 0.0)
            on_wait(f"{why}; reconnecting for up to {left:.0f} s")
        await asyncio.sleep(delay)  # back off before reconnecting
        delay = min(delay * 2, 2.0)
