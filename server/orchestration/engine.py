"""The orchestration engine: owns one workflow task per live generation, durable across restarts.

Everything a workflow needs lives in the database, so on start-up the engine resumes
every generation that has not reached a terminal state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import datetime

from server.compute.base import ComputeBackend
from server.config import OrchestrationSettings
from server.domain.enums import GenerationStatus
from server.domain.model import ResourceError
from server.domain.states import GENERATION_TERMINAL
from server.media.artifacts import FileArtifactStore
from server.orchestration.base_flow import BaseWorkflow
from server.store import repository
from server.store.models import Generation, utcnow
from server.store.uow import Store

log = logging.getLogger(__name__)


class Engine:
    """Runs, resumes and cancels generations; every task it starts is awaited on shutdown."""

    def __init__(
        self,
        store: Store,
        compute: ComputeBackend,
        artifacts: FileArtifactStore,
        *,
        settings: OrchestrationSettings,
    ) -> None:
        self._store = store
        self._settings = settings
        self._slots = asyncio.Semaphore(settings.max_tasks_in_flight)
        self._workflow = BaseWorkflow(store, compute, artifacts, self._slots, settings=settings)
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: set[str] = set()
        self._started = False
        self._closed = False

    async def start(self) -> None:
        """Resume every generation left unfinished by an earlier process."""
        if self._started:
            return
        self._started = True
        async with self._store.read() as session:
            pending = await repository.non_terminal_generation_ids(session)
        for generation_id in pending:
            self.submit(generation_id)
        if pending:
            log.info("resumed %d unfinished generations", len(pending))

    @property
    def in_flight(self) -> int:
        """How many generations have a live workflow here."""
        return len(self._running)

    def submit(self, generation_id: str) -> None:
        """Run the generation's workflow unless it runs already."""
        if self._closed or generation_id in self._running:
            return
        task = asyncio.create_task(self._guarded(generation_id), name=f"generation:{generation_id}")
        self._running[generation_id] = task
        task.add_done_callback(lambda _t: self._running.pop(generation_id, None))

    def request_cancel(self, generation_id: str) -> None:
        """Have the engine record a cancellation the store already marked CANCELLING.

        A live workflow is stopped and records it; otherwise a workflow is started for
        it, so the work never depends on the caller's RPC staying connected.
        """
        task = self._running.get(generation_id)
        if task is None:
            self.submit(generation_id)  # _run finishes a CANCELLING generation
            return
        self._cancel_requested.add(generation_id)
        if not task.cancel():
            # Already finished: its last transaction saw CANCELLING and settled it.
            self._cancel_requested.discard(generation_id)

    async def shutdown(self) -> None:
        """Stop every workflow, leaving its state for the next start to resume; idempotent."""
        self._closed = True
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _guarded(self, generation_id: str) -> None:
        try:
            await self._run(generation_id)
        except asyncio.CancelledError:
            if generation_id not in self._cancel_requested:
                raise  # shutdown: leave the generation for the next start
            # Not shielded: if shutdown interrupts this, the generation stays CANCELLING
            # and the next start finishes it.
            await self._workflow.finish_cancel(generation_id)
        except Exception:
            correlation_id = uuid.uuid4().hex
            log.exception(
                "workflow of generation %s failed (correlation id %s)",
                generation_id,
                correlation_id,
            )
            await self._workflow.fail(generation_id, ResourceError.internal(correlation_id))
        finally:
            self._cancel_requested.discard(generation_id)

    async def _run(self, generation_id: str) -> None:
        async with self._store.read() as session:
            generation = await session.get(Generation, generation_id)
        if generation is None or GenerationStatus(generation.status) in GENERATION_TERMINAL:
            return
        if generation.status == GenerationStatus.CANCELLING:
            await self._workflow.finish_cancel(generation_id)
            return
        remaining = _seconds_left(generation.deadline_at)
        try:
            async with asyncio.timeout(remaining):
                await self._workflow.run(generation)
        except TimeoutError:
            await self._workflow.expire(generation_id)


def _seconds_left(expire_at: datetime | None) -> float | None:
    if expire_at is None:
        return None
    return max((expire_at - utcnow()).total_seconds(), 0.0)
