"""The orchestration engine: one workflow task per live generation, durable across restarts.

Each live generation's records live in memory, owned by its workflow; every change goes
through its recorder to the single writer. On start-up the engine claims every generation
left unfinished and resumes it from what the database holds. Every task it starts is
kept and, on shutdown, cancelled and awaited (their generations resume at the next
start); cancels and deadlines stop workflows through their tokens instead.

Where replicas share the database (``leases``), the engine also keeps its leases: it
renews them every third of their length, claims what other replicas left (a lease that
ran out, a replica that shut down) as soon as it can, carries out the cancels other
replicas recorded for its generations, and stops, without a word to compute, the
workflows of generations another replica has claimed since (the new owner re-attaches
their compute tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter, OrderedDict

from server.compute.base import ComputeBackend
from server.compute.retry import RetryPolicy
from server.domain.enums import GenerationStatus
from server.domain.model import Generation, ResourceError
from server.domain.recorder import full_snapshot, utcnow
from server.orchestration.closing import close
from server.orchestration.live import LiveGeneration, Stop, Stopped
from server.orchestration.workflows import WorkflowRegistry
from server.store import mapping, repository
from server.store.leases import Claim, LeaseLost, Leases, Wakeups
from server.store.sessions import Store
from server.store.writer import Writer

log = logging.getLogger(__name__)


class Engine:
    """Runs, resumes and stops generations."""

    def __init__(
        self,
        store: Store,
        writer: Writer,
        compute: ComputeBackend,
        workflows: WorkflowRegistry,
        *,
        max_running: int,
        release_retry: RetryPolicy | None = None,
        leases: Leases | None = None,
        wakeup: Wakeups | None = None,
    ) -> None:
        self._store = store
        self._writer = writer
        self._compute = compute
        self._workflows = workflows
        self._max_running = max_running
        self._release_retry = release_retry
        self._live: dict[str, LiveGeneration] = {}
        self._live_by_org: Counter[str] = Counter()
        # Creates admitted but not launched yet (on their way to the commit): they count
        # against the limits too, or concurrent creates would all pass the same check.
        self._reserved = 0
        self._reserved_by_org: Counter[str] = Counter()
        # Generations waiting for capacity are data, not tasks: a workflow starts once
        # fewer than ``max_running`` run (or at once when it must be closed). They wait
        # per organization, and organizations take turns (round robin), so one tenant's
        # thousand generations do not hold back another tenant's one.
        self._waiting = FairQueue()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._closed = False
        # Shared database: this replica's claims, and what wakes their keeper early (a
        # replica released its generations, or recorded a cancel for one of ours).
        self._leases = leases
        self._wakeup = wakeup or Wakeups()
        self._keeper: asyncio.Task[None] | None = None
        self._lost_ids: set[str] = set()
        # Whether the deployment's line was found empty by the last claim (until a
        # replica announces a generation joined it).
        self._line_empty = False
        if leases is not None:
            writer.on_lost = self._lost

    @property
    def workflows(self) -> WorkflowRegistry:
        """The workflow of each orchestration type this engine runs."""
        return self._workflows

    @property
    def writer(self) -> Writer:
        """The writer every change of a live generation goes through."""
        return self._writer

    @property
    def in_flight(self) -> int:
        """How many generations are live here (running or waiting), or being created."""
        return len(self._live) + self._reserved

    @property
    def waiting(self) -> int:
        """How many live generations wait for a workflow to start."""
        return len(self._waiting)

    def live_count(self, organization: str) -> int:
        """How many generations of ``organization`` are live here, or being created."""
        return self._live_by_org[organization] + self._reserved_by_org[organization]

    def reserve(self, organization: str) -> Reservation:
        """Count one more generation of ``organization`` until the reservation is released.

        A create holds one from its admission until its generation is launched (which
        counts it as live) or the create fails.
        """
        self._reserved += 1
        self._reserved_by_org[organization] += 1
        return Reservation(self, organization)

    def _unreserve(self, organization: str) -> None:
        self._reserved -= 1
        self._reserved_by_org[organization] -= 1
        if not self._reserved_by_org[organization]:
            del self._reserved_by_org[organization]

    def queue_position(self, generation_id: str) -> int:
        """The generation's place among those waiting to start (1 = next), 0 if not waiting."""
        return self._waiting.position(generation_id)

    @property
    def shared(self) -> bool:
        """Whether other replicas may run generations of this database."""
        return self._leases is not None

    async def start(self) -> None:
        """Claim every unfinished generation this process may run, and resume it."""
        if self._leases is not None:
            # Those nobody holds, and those of a dead predecessor under this name.
            await self._adopt(await self._leases.claim(room=self._room(), predecessor=True))
            self._keeper = asyncio.create_task(self._keep_leases(), name="leases")
            return
        claimed = await self._writer.claim_unfinished()  # one process owns the database
        await self._adopt([Claim(generation_id, False) for generation_id in claimed])

    async def _adopt(self, claims: list[Claim]) -> None:
        """Resume generations just claimed; carry out the cancels recorded for them."""
        fresh = [claim for claim in claims if claim.id not in self._live]
        if not fresh or self._closed:
            return
        async with self._store.read() as session:
            rows = await repository.generations_by_id(session, [c.id for c in fresh])
            generations = [mapping.generation(row) for row in rows]
        cancels = {claim.id for claim in fresh if claim.cancel_requested}
        for generation in generations:
            live = LiveGeneration(generation, self._writer)
            self.launch(live)
            if generation.id in cancels:
                await self._cancel_quietly(live)
        log.info("resumed %d unfinished generations", len(generations))

    async def _keep_leases(self) -> None:
        """Renew, claim and carry out recorded cancels until shutdown (shared database)."""
        leases = self._leases
        assert leases is not None
        interval = leases.lease_seconds / 3
        renew_at = time.monotonic() + interval
        expiry_at = renew_at
        kinds: set[str] = set()  # none: a round of its own, everything is looked at
        while True:
            try:
                if time.monotonic() >= renew_at:
                    renew_at = time.monotonic() + interval
                    self._lost(await leases.renew())
                # The line alone (a generation joined it, a workflow ended here) asks
                # for a claim, and only when there is room for one.
                whole = not kinds <= {Wakeups.WAITING, Wakeups.ROOM}
                if whole or self._room():
                    await self._claim()
                if whole:
                    for generation_id in await leases.cancel_requests():
                        live = self._live.get(generation_id)
                        if live is not None:
                            await self._cancel_quietly(live)
                    # Look again when the first lease of another replica runs out.
                    expiry = await leases.next_expiry()
                    expiry_at = time.monotonic() + (interval if expiry is None else expiry)
            except Exception as exc:
                log.warning("keeping the leases failed (%s); trying again", type(exc).__name__)
                expiry_at = time.monotonic() + interval
            wait = min(renew_at, max(expiry_at, time.monotonic() + 0.2) + 0.02) - time.monotonic()
            kinds = await self._wakeup.wait(max(wait, 0.02))
            if Wakeups.WAITING in kinds:
                self._line_empty = False  # a workflow's end here takes from it then

    def _room(self) -> int:
        """How many more workflows could start here now."""
        return max(self._max_running - len(self._tasks) - len(self._waiting), 0)

    def has_room(self) -> bool:
        """Whether a new generation would start at once (none waits, a workflow is free)."""
        return self._room() > 0

    async def _claim(self) -> None:
        """Claim what dead replicas left, and from the deployment's line what fits here."""
        assert self._leases is not None
        room = self._room()
        claims = await self._leases.claim(room=room)
        self._line_empty = sum(claim.waited for claim in claims) < room
        await self._adopt(claims)

    async def join_line(self, generation_id: str) -> int:
        """A generation was created for the deployment's line: wake the other replicas.

        Returns its place in the line (1 = next; 0 if a replica took it already).
        """
        assert self._leases is not None
        return await self._leases.join_line(generation_id)

    async def position(self, generation: Generation) -> int:
        """The generation's place among those waiting to start, here or in the deployment."""
        local = self.queue_position(generation.id)
        if local or self._leases is None or generation.status is not GenerationStatus.PENDING:
            return local
        if generation.id in self._live:
            return 0
        return await self._leases.queue_position(generation.id)

    async def _cancel_quietly(self, live: LiveGeneration) -> None:
        """Cancel a generation whose cancel another replica recorded."""
        try:
            await self.cancel(live)
        except LeaseLost:
            return  # another replica runs it now, and carries the cancel out
        except Exception:
            log.exception("recording the cancel of generation %s failed", live.id)

    def _lost(self, generation_ids: set[str]) -> None:
        """Another replica claimed these: stop their workflows here, releasing nothing."""
        for generation_id in generation_ids:
            if self._leases is not None:
                self._leases.forget(generation_id)
            live = self._live.get(generation_id)
            if live is None:
                continue
            log.warning("generation %s is run by another replica now; stopping here", live.id)
            self._lost_ids.add(generation_id)
            if self._waiting.remove(generation_id):
                self._retire(live)
            task = self._tasks.get(generation_id)
            if task is not None:
                task.cancel()

    async def _still_held(self, live: LiveGeneration) -> bool:
        """Before releasing a generation's compute tasks: whether it is still ours.

        A replica paused past its lease may find a deadline passed when it wakes; the
        tasks then belong to the replica that claimed the generation meanwhile.
        """
        if self._leases is None:
            return True
        try:
            held = await self._leases.still_holds(live.id)
        except Exception as exc:
            log.warning("could not check the lease of %s (%s)", live.id, type(exc).__name__)
            return True  # the writes that follow are fenced all the same
        if not held:
            log.warning("generation %s is run by another replica now; stopping here", live.id)
            self._leases.forget(live.id)
        return held

    async def cancel_elsewhere(self, organization: str, generation_id: str) -> Generation | None:
        """Cancel a live generation this replica does not run (shared database).

        The cancel is recorded for the generation's owner, which is woken. When nobody
        holds the generation (its owner shut down or died), this replica claims it and
        cancels it itself, and returns it once CANCELLING is durable; otherwise None:
        the owner carries the cancel out.
        """
        leases = self._leases
        assert leases is not None
        if not await leases.request_cancel(organization, generation_id):
            return None  # it ended meanwhile
        claims = await leases.claim(only=generation_id, room=1)
        await self._adopt(claims)
        live = self._live.get(generation_id)
        if live is None:
            return None
        return await self.cancel(live)

    def launch(self, live: LiveGeneration) -> int:
        """Take charge of a generation whose records are durable: run it now or queue it.

        Returns its place among the generations waiting to start (0: it runs now).
        """
        if self._closed or live.id in self._live:
            return 0
        generation = live.generation
        self._live[live.id] = live
        self._live_by_org[generation.organization] += 1
        if generation.deadline_at is not None:
            delay = max((generation.deadline_at - utcnow()).total_seconds(), 0.0)
            loop = asyncio.get_running_loop()
            self._timers[live.id] = loop.call_later(delay, live.token.stop, Stop.DEADLINE_EXCEEDED)
        if generation.status is GenerationStatus.CANCELLING:
            live.token.stop(Stop.CANCELLED)  # an interrupted cancel: finish it
        if live.token.stopped or len(self._tasks) < self._max_running:
            self._start(live)
            return 0
        live.token.on_stop(lambda: self._promote(live))
        return self._waiting.push(generation.organization, live)

    def get(self, organization: str, generation_id: str) -> LiveGeneration | None:
        """The live generation with this id, if this process runs it for ``organization``."""
        live = self._live.get(generation_id)
        if live is None or live.generation.organization != organization:
            return None
        return live

    async def cancel(self, live: LiveGeneration) -> Generation:
        """Stop a live generation: CANCELLING now, CANCELLED once compute released it.

        Returns the generation as it stands once the CANCELLING state is durable (or
        unchanged, if it had finished already).
        """
        generation = live.generation
        if not generation.done and generation.status is not GenerationStatus.CANCELLING:
            live.recorder.generation_status(GenerationStatus.CANCELLING)
        if not generation.done:
            live.token.stop(Stop.CANCELLED)
        await live.flush()
        return full_snapshot(generation)

    async def shutdown(self) -> None:
        """Stop every workflow, leaving its generation for the next start; idempotent."""
        self._closed = True
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
            self._keeper = None
        self._waiting.clear()
        for timer in self._timers.values():
            timer.cancel()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _start(self, live: LiveGeneration) -> None:
        task = asyncio.create_task(self._drive(live), name=f"generation:{live.id}")
        self._tasks[live.id] = task

    def _promote(self, live: LiveGeneration) -> None:
        """A waiting generation was stopped: start it now so it gets closed."""
        if self._waiting.remove(live.id) and not self._closed:
            self._start(live)

    def _start_waiting(self) -> None:
        while self._waiting and len(self._tasks) < self._max_running and not self._closed:
            self._start(self._waiting.pop())

    async def _drive(self, live: LiveGeneration) -> None:
        try:
            await self._run(live)
        finally:
            self._retire(live)
            self._tasks.pop(live.id, None)
            self._start_waiting()
            if self._leases is not None and not self._line_empty and not self._closed:
                self._wakeup.notify(Wakeups.ROOM)  # take the next from the deployment's line

    def _retire(self, live: LiveGeneration) -> None:
        """Stop counting the generation as run here (it ended, or is left to another)."""
        timer = self._timers.pop(live.id, None)
        if timer is not None:
            timer.cancel()
        if self._live.pop(live.id, None) is not None:
            self._live_by_org[live.generation.organization] -= 1
        self._lost_ids.discard(live.id)
        if self._leases is not None and not self._closed:
            # Not renewed any more: unless it ended, its lease runs out and it is claimed
            # again (at shutdown, release hands over what this replica held instead).
            self._leases.forget(live.id)

    async def _run(self, live: LiveGeneration) -> None:
        reason: Stop | ResourceError
        try:
            live.token.check()
            await self._workflows.get(live.generation.type).run(live)
            return
        except Stopped as stopped:
            reason = stopped.reason
        except asyncio.CancelledError:
            raise  # shutdown: the generation resumes at the next start
        except LeaseLost:
            return  # another replica runs it now
        except Exception:
            correlation_id = uuid.uuid4().hex
            log.exception(
                "workflow of generation %s failed (correlation id %s)", live.id, correlation_id
            )
            reason = ResourceError.internal(correlation_id)
        if live.id in self._lost_ids or not await self._still_held(live):
            return  # another replica claimed it: its compute tasks are that one's now
        try:
            await close(live, self._compute, reason, retry=self._release_retry)
        except LeaseLost:
            return
        except Exception:
            # Nothing more can be recorded now; the next start resumes the generation.
            log.exception("closing generation %s failed", live.id)


class Reservation:
    """A create's place in the engine's counts; ``with`` releases it, once."""

    def __init__(self, engine: Engine, organization: str) -> None:
        self._engine: Engine | None = engine
        self._organization = organization

    def release(self) -> None:
        """Give the place back; idempotent."""
        if self._engine is not None:
            self._engine._unreserve(self._organization)
            self._engine = None

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class FairQueue:
    """Waiting generations, first in first out per organization, organizations in turn.

    ``pop`` takes the oldest generation of the organization whose turn it is, then
    sends that organization to the back of the line.
    """

    def __init__(self) -> None:
        self._by_org: OrderedDict[str, OrderedDict[str, LiveGeneration]] = OrderedDict()
        self._org_of: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._org_of)

    def push(self, organization: str, live: LiveGeneration) -> int:
        """Queue ``live`` behind the organization's earlier ones; returns its position."""
        queue = self._by_org.setdefault(organization, OrderedDict())
        queue[live.id] = live
        self._org_of[live.id] = organization
        return self._position(organization, len(queue) - 1)

    def pop(self) -> LiveGeneration:
        """The next generation to start.

        Raises:
            KeyError: nothing waits.
        """
        organization, queue = next(iter(self._by_org.items()))
        generation_id, live = queue.popitem(last=False)
        del self._org_of[generation_id]
        if queue:
            self._by_org.move_to_end(organization)
        else:
            del self._by_org[organization]
        return live

    def remove(self, generation_id: str) -> bool:
        """Take a generation out of the line; False if it was not waiting."""
        organization = self._org_of.pop(generation_id, None)
        if organization is None:
            return False
        queue = self._by_org[organization]
        del queue[generation_id]
        if not queue:
            del self._by_org[organization]
        return True

    def clear(self) -> None:
        """Forget every waiting generation."""
        self._by_org.clear()
        self._org_of.clear()

    def position(self, generation_id: str) -> int:
        """Where ``generation_id`` stands (1 = next to start), 0 when it is not waiting.

        Organizations take turns, so the k-th generation of an organization goes after
        k turns of every organization that still has generations waiting by then.
        """
        organization = self._org_of.get(generation_id)
        if organization is None:
            return 0
        return self._position(organization, list(self._by_org[organization]).index(generation_id))

    def _position(self, organization: str, rank: int) -> int:
        """The position of the organization's generation with ``rank`` earlier ones."""
        position = rank  # the organization's own earlier ones
        ahead = True  # organizations before it in the rotation take one turn more
        for org, queue in self._by_org.items():
            if org == organization:
                ahead = False
                continue
            position += min(len(queue), rank + 1 if ahead else rank)
        return position + 1
