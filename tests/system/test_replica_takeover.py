"""Replica processes on one PostgreSQL database: ownership, takeover, fencing, cancels.

Real ``python -m server`` processes share one database, one artifact directory and one
compute server (``tests/holding_compute.py``), which holds every task until the test
releases it and counts, per idempotency key, every submit and who sent it. Each replica
process calls compute with a token of its own, so compute tells which process submitted,
followed or cancelled a task. The lease is 4 s unless a test says otherwise; the
ownership columns (``generations.owner``, ``fence``, ``cancel_requested_at``) and the
event log are read directly from PostgreSQL. Every test ends with the same proof
(``replica_rig.check_logs``): each generation ended as it should, its events are
1..n with one terminal event, the organization's cursors are 1..N, and compute was
asked once per task.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import time
from collections.abc import AsyncIterator
from datetime import UTC
from pathlib import Path

import grpc
import pytest
from helpers import CatalogStub, assert_eventually, create_product, generate_request
from pg import fresh_database, requires_postgres
from replica_rig import LEASE, Compute, Database, Replica, Timer, check_logs, deployment
from watching import Stream, percentile

from sartiq_grpc.sartiq.generation.v1 import enums_pb2
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb

pytestmark = requires_postgres
HEARTBEAT = 30.0  # the replicas' heartbeat (replica_rig): no watcher sees one in a test

ENDED = {"COMPLETED", "PARTIALLY_COMPLETED", "FAILED", "CANCELLED"}
# How a replica says, in its log, that it found another had claimed one of its generations.
LOST_LEASE = re.compile(r"generation (\S+) is run by another replica now")


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def compute(tmp_path: Path) -> AsyncIterator[Compute]:
    server = Compute(tmp_path / "compute")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def create_on(replica: Replica, product_id: str, request_id: str = "") -> str:
    assert replica.stub is not None
    request = generate_request(product_id)
    request.request_id = request_id
    return (await replica.stub.CreateGenerateGeneration(request, timeout=10)).generation.id


async def create_round_robin(
    replicas: list[Replica], product_id: str, count: int
) -> dict[str, Replica]:
    """Create ``count`` generations on the replicas in turn; which replica created each.

    One round at a time, the calls of a round concurrent.
    """
    created: dict[str, Replica] = {}
    for start in range(0, count, len(replicas)):
        chosen = [
            replicas[n % len(replicas)] for n in range(start, min(count, start + len(replicas)))
        ]
        ids = await asyncio.gather(*(create_on(r, product_id) for r in chosen))
        created.update(zip(ids, chosen, strict=True))
    return created


async def owner_names(
    db: Database, created: dict[str, Replica], replicas: list[Replica]
) -> dict[str, str]:
    """Each replica's name as the store shows it: the owner of what it created."""
    rows = await db.generations()
    names: dict[str, set[str | None]] = {r.label: set() for r in replicas}
    for generation_id, replica in created.items():
        names[replica.label].add(rows[generation_id].owner)
    found: dict[str, str] = {}
    for label, owners in names.items():
        assert len(owners) == 1, f"{label} created generations owned by {owners}"
        assert None not in owners, f"{label} created generations owned by nobody"
        found[label] = str(next(iter(owners)))
    assert len(set(found.values())) == len(found), f"replica names are not unique: {found}"
    return found


def summary(seconds: list[float]) -> str:
    return (
        f"min {min(seconds):.2f} s, median {statistics.median(seconds):.2f} s, "
        f"max {max(seconds):.2f} s"
    )


# -- 1 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
async def test_kill_owner_under_load(
    count: int, tmp_path: Path, database_url: str, db: Database, compute: Compute
) -> None:
    """Survivors take over what a killed owner held, within lease + 2 s, and finish it.

    They resume from the stored compute ids (no second submit); watchers opened before
    the kill on the survivors get every event once, live.
    """
    total = 36
    async with (
        deployment(tmp_path, database_url, compute) as dep,
        contextlib.AsyncExitStack() as streams_open,
    ):
        replicas = await dep.start(*(f"replica-{n}" for n in range(count)))
        victim, survivors = replicas[0], replicas[1:]
        assert victim.channel is not None
        product_id = await create_product(CatalogStub(victim.channel))
        streams = []
        for replica in survivors:
            assert replica.stub is not None
            call = replica.stub.WatchGenerations(pb.WatchGenerationsRequest(after_cursor=0))
            await call.wait_for_connection()
            streams.append(Stream(call))
            streams_open.push_async_callback(streams[-1].stop)
        created = await create_round_robin(replicas, product_id, total)
        # Every task has reached compute and its compute id is stored: a takeover must
        # re-attach to it, never submit it again.
        await db.wait_attached(total)
        names = await owner_names(db, created, replicas)
        before = await db.generations()
        theirs = {i for i, row in before.items() if row.owner == names[victim.label]}
        assert theirs == {i for i, r in created.items() if r is victim}
        survivor_names = {names[r.label] for r in survivors}

        clock = Timer()
        await victim.kill()
        claimed: dict[str, float] = {}
        claimers: dict[str, str | None] = {}
        moved: set[str] = set()  # survivors' own generations claimed meanwhile (renewed: none)

        async def all_claimed() -> bool:
            rows = await db.generations()
            now = clock()
            for generation_id in theirs - claimed.keys():
                row = rows[generation_id]
                claimers[generation_id] = row.owner
                if row.owner in survivor_names and row.fence > before[generation_id].fence:
                    claimed[generation_id] = now
            moved.update(
                i for i, row in rows.items() if i not in theirs and row.fence != before[i].fence
            )
            return len(claimed) == len(theirs)

        try:
            await assert_eventually(all_claimed, timeout=LEASE + 10, interval=0.05)
        except AssertionError:
            left = {i: claimers[i] for i in theirs - claimed.keys()}
            raise AssertionError(f"{len(left)} generations not claimed: {left}") from None
        takeover = sorted(claimed.values())
        print(
            f"\n{count} replicas, {total} generations, lease {LEASE:.0f} s: the {len(theirs)} "
            f"of the killed one claimed after {summary(takeover)}"
        )
        assert takeover[-1] <= LEASE + 2, f"takeover took {takeover[-1]:.2f} s"
        assert not moved, f"survivors' generations changed hands: {moved}"

        await compute.release()
        await db.wait_statuses(set(created), {"COMPLETED"}, timeout=20)
        events = await check_logs(db, compute, set(created))
        remote = await compute.tasks()
        tasks = await db.tasks()
        for key, task in remote.items():
            if tasks[key].generation_id in theirs:
                assert set(task["followers"]) - {victim.token}, f"nobody re-attached {key}"

        async def all_arrived() -> bool:
            return all(len(s.events()) >= len(events) for s in streams)

        await assert_eventually(all_arrived, timeout=10)
        for stream in streams:
            await stream.stop()
    logged = [(e.generation_id, e.sequence, e.cursor) for e in events]
    wall_offset = time.time() - time.monotonic()
    delays = []
    for stream in streams:
        received = [(e.generation_id, e.sequence, e.cursor) for e in stream.events()]
        assert received == logged, "a watcher missed, repeated or reordered events"
        assert stream.heartbeats() == 0
        for arrived, item in stream.items:
            if not item.HasField("event"):
                continue
            made = item.event.event_time.ToDatetime(tzinfo=UTC).timestamp()
            delays.append(arrived + wall_offset - made)
    print(
        f"event time to delivery on the {len(streams)} surviving watchers: "
        f"p50 {percentile(delays, 0.5) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms"
    )
    assert max(delays) < HEARTBEAT / 3, "events reached a watcher late, not live"


# -- 2 ------------------------------------------------------------------------------------


async def test_paused_owner_is_fenced(
    tmp_path: Path, database_url: str, db: Database, compute: Compute
) -> None:
    """An owner stopped (SIGSTOP) past its lease loses its generations, and knows it.

    Once it runs again it commits nothing for those generations and releases nothing on
    compute, even though their tasks complete under its eyes; it logs that it lost the
    leases and serves on.
    """
    total = 16
    async with deployment(tmp_path, database_url, compute) as dep:
        paused, other = await dep.start("replica-a", "replica-b")
        assert paused.channel is not None
        product_id = await create_product(CatalogStub(paused.channel))
        created = await create_round_robin([paused, other], product_id, total)
        await db.wait_attached(total)
        names = await owner_names(db, created, [paused, other])
        before = await db.generations()
        theirs = {i for i, row in before.items() if row.owner == names[paused.label]}
        assert theirs == {i for i, r in created.items() if r is paused}

        clock = Timer()
        paused.pause()
        try:

            async def claimed() -> bool:
                rows = await db.generations()
                return all(
                    rows[i].owner == names[other.label] and rows[i].fence > before[i].fence
                    for i in theirs
                )

            await assert_eventually(claimed, timeout=LEASE + 10, interval=0.05)
            takeover = clock()
        finally:
            paused.resume()
        print(f"\npaused owner: its {len(theirs)} generations claimed after {takeover:.2f} s")
        # Renewed every third of the lease, the claim held at least two thirds of it.
        assert LEASE * 2 / 3 - 0.5 <= takeover <= LEASE + 2
        # The tasks complete now: the paused replica, running again, sees them end as the
        # new owner does, and must not record it.
        await compute.release()
        await db.wait_statuses(set(created), {"COMPLETED"}, timeout=20)

        lost: set[str] = set()

        async def found_out() -> bool:
            for record in paused.log_records():
                found = LOST_LEASE.search(str(record.get("message", "")))
                if found is not None:
                    lost.add(found.group(1))
            return lost >= theirs

        try:
            await assert_eventually(found_out, timeout=LEASE)
        except AssertionError:
            raise AssertionError(f"its log names {len(lost)} of {len(theirs)} as lost") from None
        assert lost == theirs
        await check_logs(db, compute, set(created))
        remote = await compute.tasks()
        tasks = await db.tasks()
        for key, task in remote.items():
            if tasks[key].generation_id in theirs:
                assert task["cancels"] == [], f"{key} was released by {task['cancels']}"
                assert other.token in task["followers"], f"{key} was not re-attached"
        # The paused replica lost those generations, not its place: it serves on.
        assert paused.process.returncode is None
        await compute.hold_for(0)
        fresh = await create_on(paused, product_id)
        rows = await db.wait_statuses({fresh}, {"COMPLETED"}, timeout=10)
        assert rows[fresh].owner is None


# -- 3 ------------------------------------------------------------------------------------


async def test_cancel_on_a_non_owner(
    tmp_path: Path, database_url: str, db: Database, compute: Compute
) -> None:
    """A cancel sent to a replica that does not own the generation reaches its owner.

    It is recorded; the owner releases the compute task and ends the generation
    CANCELLED; the RPC answers CANCELLING or CANCELLED, once the owner recorded it.
    """
    async with deployment(tmp_path, database_url, compute) as dep:
        owner, other = await dep.start("replica-a", "replica-b")
        assert owner.channel is not None
        assert other.stub is not None
        product_id = await create_product(CatalogStub(owner.channel))
        generation_id = await create_on(owner, product_id)
        tasks = await db.wait_attached(1)
        clock = Timer()
        answer = await other.stub.CancelGeneration(
            pb.CancelGenerationRequest(generation_id=generation_id), timeout=LEASE * 2
        )
        answered = clock()
        assert answer.generation.id == generation_id
        assert answer.generation.status in (
            enums_pb2.GENERATION_STATUS_CANCELLING,
            enums_pb2.GENERATION_STATUS_CANCELLED,
        ), enums_pb2.GenerationStatus.Name(answer.generation.status)
        row = (await db.generations())[generation_id]
        assert row.cancel_requested_at is not None, "the cancel was not recorded"
        assert row.status in ("CANCELLING", "CANCELLED"), "answered before the owner recorded it"
        await db.wait_statuses({generation_id}, {"CANCELLED"}, timeout=LEASE + 5)
        ended = clock()
        print(
            f"\ncancel on a non-owner: answered after {answered:.2f} s, "
            f"CANCELLED after {ended:.2f} s"
        )
        await check_logs(db, compute, {generation_id}, status="CANCELLED")
        (task,) = tasks.values()
        remote = (await compute.tasks())[task.id]
        assert remote["status"] == "cancelled"
        assert remote["cancels"], "compute never saw the task released"
        assert set(remote["cancels"]) == {owner.token}, "released by another than its owner"
        assert other.token not in remote["followers"], "the non-owner ran the generation too"


# -- 4 ------------------------------------------------------------------------------------


async def create_anywhere(
    replicas: list[Replica], product_id: str, request_id: str, first: int
) -> tuple[str, Replica]:
    """Create on replica ``first``, or on the next ones while it is down (same request id).

    Returns the generation's id and the replica that answered.
    """
    errors = []
    for attempt in range(3 * len(replicas)):
        replica = replicas[(first + attempt) % len(replicas)]
        if replica.stub is None:
            continue
        try:
            return await create_on(replica, product_id, request_id), replica
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise
            errors.append(f"{replica.label}: {exc.code().name}")
        except grpc.aio.UsageError as exc:  # its channel closed under the call
            errors.append(f"{replica.label}: {exc}")
    raise AssertionError(f"no replica took create {request_id}: {errors}")


async def test_rolling_restart_under_load(
    tmp_path: Path, database_url: str, db: Database, compute: Compute
) -> None:
    """Three named replicas restarted one by one (SIGTERM) under load lose nothing.

    Each is started again with its name while a client creates generations without
    pause; each is stopped right after it accepted one (its workflow is then submitting
    the task). Every generation completes once, no compute task is submitted twice.
    """
    await compute.hold_for(1.5)
    async with deployment(tmp_path, database_url, compute) as dep:
        replicas = await dep.start("r0", "r1", "r2", named=True)
        assert replicas[0].channel is not None
        product_id = await create_product(CatalogStub(replicas[0].channel))
        made: dict[str, str] = {}  # request id: generation id
        accepted = {replica.label: asyncio.Event() for replica in replicas}
        done = asyncio.Event()

        async def load() -> None:
            n = 0
            while not done.is_set():
                request_id = f"load-{n}"
                made[request_id], replica = await create_anywhere(
                    replicas, product_id, request_id, n
                )
                accepted[replica.label].set()
                n += 1
                await asyncio.sleep(0.2)  # the load's pace, not a wait for anything

        loading = asyncio.create_task(load())

        async def creates(count: int, on: Replica | None = None) -> None:
            """Wait until the client has created ``count`` more (the last one on ``on``)."""
            than = len(made) + count
            if on is not None:
                accepted[on.label].clear()

            async def enough() -> bool:
                if loading.done():
                    loading.result()  # raises what stopped it
                return len(made) >= than and (on is None or accepted[on.label].is_set())

            await assert_eventually(enough, timeout=10, interval=0.005)

        async def handed_over(name: str, held: set[str]) -> float:
            """Seconds until each of ``held`` is claimed by another replica (or has ended)."""
            since = Timer()

            async def claimed() -> bool:
                rows = await db.generations()
                return all(
                    rows[i].owner not in (None, name) or rows[i].status in ENDED for i in held
                )

            await assert_eventually(claimed, timeout=LEASE * 2, interval=0.02)
            return since()

        steps = []
        handovers = []
        try:
            clock = Timer()
            for replica in replicas:
                await creates(4, on=replica)
                step = Timer()
                held = {
                    i for i, row in (await db.generations()).items() if row.owner == replica.name
                }
                assert await replica.terminate() == 0, replica.log()[-4000:]
                stopped = step()
                # Released at SIGTERM: the others claim them at once, not at the lease's end.
                assert replica.name is not None
                handovers.append(await handed_over(replica.name, held))
                await replica.restart()
                steps.append(
                    f"{replica.label} stopped in {stopped:.1f} s (its {len(held)} live "
                    f"generations claimed by others {handovers[-1]:.2f} s after its exit), "
                    f"back in {step():.1f} s"
                )
            await creates(4)
        finally:
            done.set()
            await loading
        rolled = clock()
        print(
            f"\nrolling restart of 3 replicas under load: {rolled:.1f} s, {len(made)} "
            f"generations; {'; '.join(steps)}"
        )
        assert max(handovers) < LEASE / 2, "the generations of a stopped replica waited"
        created = set(made.values())
        assert len(created) == len(made), "two requests made one generation"
        await db.wait_statuses(created, {"COMPLETED"}, timeout=20)
        await check_logs(db, compute, created)


# -- 5 ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["single", "several"])
async def test_restart_within_lease_resumes_at_once(
    shape: str, tmp_path: Path, database_url: str, db: Database, compute: Compute
) -> None:
    """A replica killed and started again with its name takes its generations back at once.

    Far sooner than the 60 s lease, re-attaching to their compute tasks; a replica
    beside it does not take them (their lease has not expired).
    """
    lease = 60
    async with deployment(
        tmp_path, database_url, compute, orchestration__lease_seconds=str(lease)
    ) as dep:
        labels = ["r0", "r1"] if shape == "several" else ["r0"]
        replicas = await dep.start(*labels, named=True)
        restarted = replicas[0]
        assert restarted.channel is not None
        product_id = await create_product(CatalogStub(restarted.channel))
        created = {}
        for _ in range(8):
            created[await create_on(restarted, product_id)] = restarted
        for beside in replicas[1:]:
            for _ in range(4):
                created[await create_on(beside, product_id)] = beside
        await db.wait_attached(len(created))
        before = await db.generations()
        theirs = {i for i, r in created.items() if r is restarted}
        assert {i for i, row in before.items() if row.owner == "r0"} == theirs
        old_token = restarted.token

        clock = Timer()
        await restarted.kill()
        await restarted.restart()
        started = clock()
        claimed: dict[str, float] = {}
        strangers: dict[str, str | None] = {}

        async def taken_back() -> bool:
            rows = await db.generations()
            now = clock()
            for generation_id in theirs:
                row = rows[generation_id]
                if row.owner not in (None, "r0"):
                    strangers[generation_id] = row.owner
                if row.owner == "r0" and row.fence > before[generation_id].fence:
                    claimed.setdefault(generation_id, now)
            return len(claimed) == len(theirs)

        await assert_eventually(taken_back, timeout=20, interval=0.05)
        times = sorted(claimed.values())
        print(
            f"\nrestart within a {lease} s lease ({shape}): started again after "
            f"{started:.2f} s, its {len(theirs)} generations claimed after {summary(times)}"
        )
        assert times[-1] <= 10
        await compute.release()
        await db.wait_statuses(set(created), {"COMPLETED"}, timeout=10)
        assert clock() <= 20
        assert not strangers, f"taken by another replica: {strangers}"
        await check_logs(db, compute, set(created))
        remote = await compute.tasks()
        tasks = await db.tasks()
        for key, task in remote.items():
            if tasks[key].generation_id in theirs:
                assert task["submits"] == [old_token]
                assert restarted.token in task["followers"], f"{key} was not re-attached"
                others = set(task["followers"]) - {old_token, restarted.token}
                assert not others, f"{key} was followed by {others}"
