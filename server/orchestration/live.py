"""A live generation: its records in memory, its recorder, its stop token, its writes.

Workflows stop cooperatively. A cancel or a deadline sets the token; the workflow sees it
between units of work (and while it waits on compute or for a slot), never in the middle
of one: a submit that started finishes and its compute id is recorded, so the task can
always be released, and a commit once queued is always committed and published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

from server.domain.errors import ResourceExhaustedError
from server.domain.model import Generation
from server.domain.recorder import Changes, Recorder
from server.store import rows
from server.store.leases import LeaseLost
from server.store.writer import Writer

T = TypeVar("T")
log = logging.getLogger(__name__)


class Stop(StrEnum):
    """Why a workflow must stop early."""

    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


class Stopped(Exception):  # noqa: N818 - a signal, not an error condition
    """Raised inside a workflow at a check point once its token is set."""

    def __init__(self, reason: Stop) -> None:
        super().__init__(reason.value)
        self.reason = reason


class StopToken:
    """Set once, with a reason; a cancel wins over a deadline that comes after it."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.reason: Stop | None = None
        self._listeners: list[Callable[[], None]] = []

    @property
    def stopped(self) -> bool:
        """Whether the workflow must stop."""
        return self.reason is not None

    def stop(self, reason: Stop) -> None:
        """Ask the workflow to stop; the first reason given stays."""
        if self.reason is None:
            self.reason = reason
            self._event.set()
            for listener in self._listeners:
                listener()

    def on_stop(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (once, synchronously) when the token is set."""
        self._listeners.append(listener)

    def check(self) -> None:
        """A check point between units of work.

        Raises:
            Stopped: the token is set.
        """
        if self.reason is not None:
            raise Stopped(self.reason)

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` unless the token is set first.

        Raises:
            Stopped: the token was set.
        """
        await self.race(asyncio.sleep(seconds))

    async def race(self, awaitable: Awaitable[T]) -> T:
        """Wait for ``awaitable`` unless the token is set first (then it is cancelled).

        Only use it for waits that are safe to abandon: reading compute's progress,
        waiting for a slot, backing off. Never for a submit or a commit.

        Raises:
            Stopped: the token was set before ``awaitable`` finished.
        """
        if self.reason is not None:
            if asyncio.iscoroutine(awaitable):
                awaitable.close()  # never started: not a coroutine "never awaited"
            raise Stopped(self.reason)
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait((work, stop), return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Whether the token fired or this task itself is being cancelled (shutdown),
            # the abandoned wait is finished here, so nothing it held is still in use.
            stop.cancel()
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if not work.cancelled():
            return work.result()
        raise Stopped(self.reason or Stop.CANCELLED)


class LiveGeneration:
    """One generation a workflow is driving in this process."""

    def __init__(
        self, generation: Generation, writer: Writer, *, new: bool = False, held: bool = True
    ) -> None:
        self.generation = generation
        # False: committed for the deployment's line, held by no replica (never run here).
        self._held = held
        # Loaded from the store (a restart, a takeover), not created by this process.
        self.resumed = not new
        self.recorder = Recorder(generation, new=new)
        self.token = StopToken()
        self._writer = writer
        self._unconfirmed: set[asyncio.Future[None]] = set()
        self._failure: BaseException | None = None

    @property
    def id(self) -> str:
        """The generation's id."""
        return self.generation.id

    def flush_soon(self) -> None:
        """Queue what was recorded without waiting for it to be durable."""
        if not self.recorder.pending:
            return
        queued = self._queue(self.recorder.take())
        self._unconfirmed.add(queued)
        queued.add_done_callback(self._settled)

    def _queue(self, changes: Changes) -> asyncio.Future[None]:
        """Hand ``changes`` to the writer; the future of their commit."""
        owner = self._writer.owner if self._held else None
        ops = rows.changes_ops(changes, owner=owner, lease_expires_at=self._writer.lease_expiry())
        # A create must fit the deployment's limits where the database counts them.
        admit = self.generation.organization if changes.new else None
        return self._writer.submit(
            ops,
            changes.events,
            admit=admit,
            generation=self.id if self._held else None,
            new=changes.new,
        )

    async def flush(self) -> None:
        """Queue what was recorded and wait until it, and everything queued before, is durable.

        Raises:
            Exception: a queued write failed (the database refused it).
        """
        self.flush_soon()
        if self._unconfirmed:
            # Every caller waits for every write still in flight, not only its own: a
            # cancel arriving during the workflow's terminal commit answers after it.
            # Shielded: a caller cancelled while waiting does not undo the write.
            await asyncio.shield(asyncio.gather(*self._unconfirmed, return_exceptions=True))
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    async def flush_final(self, *, tries: int = 4, delay_s: float = 0.25) -> None:
        """Flush what was recorded; while its write fails, write the same changes again.

        For the terminal commit of a generation that is closing: a failed transaction
        wrote nothing, so its rows and events can be sent again as they were. Failures of
        earlier writes were logged when they happened and are not raised here.

        Raises:
            Exception: the last failure, once ``tries`` writes of the changes failed.
        """
        changes = self.recorder.take() if self.recorder.pending else None
        for attempt in range(tries):
            queued: asyncio.Future[None] | None = None
            if changes is not None:
                queued = self._queue(changes)
                # Waited for by every flush (a cancel answers after it), but its failure
                # is handled here rather than kept for the next flush.
                self._unconfirmed.add(queued)
                queued.add_done_callback(self._unconfirmed.discard)
            await asyncio.shield(asyncio.gather(*self._unconfirmed, return_exceptions=True))
            self._failure = None
            if queued is None or queued.cancelled() or queued.exception() is None:
                return
            failure = queued.exception()
            if attempt + 1 == tries and failure is not None:
                raise failure
            log.warning("the terminal write of generation %s failed; writing it again", self.id)
            await asyncio.sleep(delay_s * 2**attempt)

    def _settled(self, write: asyncio.Future[None]) -> None:
        """A queued write finished; keep its failure for the next ``flush`` to report."""
        self._unconfirmed.discard(write)
        if not write.cancelled() and (failure := write.exception()) is not None:
            # A refused create is an answer; a lost lease is handled by the engine.
            if not isinstance(failure, ResourceExhaustedError | LeaseLost):
                log.warning("a queued write of a live generation failed", exc_info=failure)
            self._failure = failure
