"""Watchers on any replica get every event once, live, whichever replica committed it.

Several apps (replicas) share one PostgreSQL database; each drives the generations it
created. A commit's NOTIFY wakes the other replicas, whose watchers read the table. The
heartbeat is far longer than any wait here, so it cannot be what delivers an event; its
recheck is covered by ``test_watch_dropped_publish``. The listening connection's faults
go through a TCP proxy: closed, refused, or silenced.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_settings
from helpers import (
    CatalogStub,
    GenerationStub,
    assert_eventually,
    create_generation,
    create_product,
    wait_submitted,
    watch_all,
)
from pg import fresh_database, requires_postgres
from sqlalchemy import text
from sqlalchemy.engine import make_url
from tcpproxy import TcpProxy
from watching import Stream, TimedBus, percentile

from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import DatabaseSettings, Settings
from server.domain.errors import StartupError
from server.store.db import create_engine

pytestmark = requires_postgres
HEARTBEAT = 30.0  # no wait below comes near it: a heartbeat delivers nothing here
STEPS = 8


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


def _settings(tmp_path: Path, url: str, **database: Any) -> Settings:
    base = make_settings(tmp_path, heartbeat_interval=HEARTBEAT)
    return base.model_copy(update={"database": DatabaseSettings(url=url, **database)})


@dataclass
class Replica:
    """One app on the shared database, its compute fake and its (timed) bus."""

    fake: FakeComputeBackend
    bus: TimedBus
    stub: GenerationStub
    catalog: CatalogStub

    def watch(self, generation_id: str) -> Stream:
        return Stream(
            self.stub.WatchGeneration(pb.WatchGenerationRequest(generation_id=generation_id))
        )

    def watch_all(self) -> Stream:
        return Stream(self.stub.WatchGenerations(pb.WatchGenerationsRequest(after_cursor=0)))

    def task(self) -> str:
        return next(iter(self.fake.tasks))


@contextlib.asynccontextmanager
async def _replicas(*settings: Settings) -> AsyncIterator[list[Replica]]:
    async with contextlib.AsyncExitStack() as stack:
        replicas = []
        for each in settings:
            fake, bus = FakeComputeBackend(hold=True), TimedBus()
            app = await stack.enter_async_context(App(each, compute=fake, bus=bus))
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
            )
            replicas.append(Replica(fake, bus, GenerationStub(channel), CatalogStub(channel)))
        yield replicas


async def _last_sequences(stub: GenerationStub, generation_ids: list[str]) -> list[int]:
    sequences = []
    for generation_id in generation_ids:
        request = pb.GetGenerationRequest(generation_id=generation_id)
        sequences.append((await stub.GetGeneration(request)).generation.last_event_sequence)
    return sequences


async def _caught_up(
    stub: GenerationStub,
    generation_ids: list[str],
    watches: dict[tuple[int, int], Stream],
    organization_streams: list[Stream],
) -> None:
    """Wait until every stream has every event committed so far."""

    async def done() -> bool:
        last = await _last_sequences(stub, generation_ids)
        return all(len(s.events()) == last[j] for (_, j), s in watches.items()) and all(
            len(s.events()) == sum(last) for s in organization_streams
        )

    await assert_eventually(done, timeout=20)


def _is(key: tuple[str, int]) -> Callable[[Any], bool]:
    return lambda event: (event.generation_id, event.sequence) == key


async def _delivered(streams: list[Stream], key: tuple[str, int], timeout: float = 10.0) -> None:
    async def everywhere() -> bool:
        return all(s.arrival(_is(key)) is not None for s in streams)

    await assert_eventually(everywhere, timeout=timeout)


async def _progress(replica: Replica, generation_id: str, value: float) -> tuple[str, int]:
    """Report progress on the replica's task; the (generation, sequence) of its event."""
    replica.fake.progress(replica.task(), value)

    async def committed() -> bool:
        return any(key[0] == generation_id and key[1] > before for key in replica.bus.published)

    before = max((k[1] for k in replica.bus.published if k[0] == generation_id), default=0)
    await assert_eventually(committed)
    return max(k for k in replica.bus.published if k[0] == generation_id)


@pytest.mark.parametrize("count", [2, 3])
async def test_watchers_on_every_replica_get_every_event_once_live(
    tmp_path: Path, pg_url: str, count: int
) -> None:
    async with _replicas(*[_settings(tmp_path, pg_url)] * count) as replicas:
        first = replicas[0].stub
        product_id = await create_product(replicas[0].catalog)
        everything = [r.watch_all() for r in replicas]
        # Replica j created generations[j] and drives it; every replica watches each.
        generation_ids = [await create_generation(r.stub, product_id) for r in replicas]
        for replica in replicas:
            await wait_submitted(replica.fake, 1)
        watches = {
            (i, j): replicas[i].watch(g) for i in range(count) for j, g in enumerate(generation_ids)
        }
        await _caught_up(first, generation_ids, watches, everything)

        # Live, one event at a time, timed from its commit to each delivery.
        local: list[float] = []
        remote: list[float] = []
        for step in range(STEPS):
            for owner, replica in enumerate(replicas):
                key = await _progress(replica, generation_ids[owner], (step + 1) / (STEPS + 1))
                concerned = [(i, s) for (i, j), s in watches.items() if j == owner]
                concerned += list(enumerate(everything))
                await _delivered([s for _, s in concerned], key)
                committed = replica.bus.published[key]
                for i, stream in concerned:
                    arrived = stream.arrival(_is(key))
                    assert arrived is not None
                    (local if i == owner else remote).append(arrived - committed)

        # Then every replica finishes its generation at once.
        for replica in replicas:
            replica.fake.complete(replica.task())

        async def ended() -> bool:
            return all(s.ended for s in watches.values())

        await assert_eventually(ended, timeout=20)
        stored = [await watch_all(first, g) for g in generation_ids]
        total = sum(len(log) for log in stored)

        async def all_arrived() -> bool:
            return all(len(s.events()) >= total for s in everything)

        await assert_eventually(all_arrived, timeout=20)
        for stream in everything:
            await stream.stop()

    for (_, j), stream in watches.items():
        assert stream.events() == stored[j]  # the whole log, each event once, in order
    keyed = sorted((e.generation_id, e.sequence) for log in stored for e in log)
    for stream in everything:
        events = stream.events()
        assert [e.cursor for e in events] == list(range(1, total + 1))
        assert sorted((e.generation_id, e.sequence) for e in events) == keyed
    streams = [*watches.values(), *everything]
    assert sum(s.heartbeats() for s in streams) == 0  # nothing waited for a heartbeat
    assert max(remote) < HEARTBEAT / 10
    print(
        f"\n{count} replicas, commit-to-delivery over {len(remote)} deliveries on other "
        f"replicas: p50 {percentile(remote, 0.5) * 1000:.1f} ms, "
        f"p99 {percentile(remote, 0.99) * 1000:.1f} ms, max {max(remote) * 1000:.1f} ms; "
        f"on the committing replica ({len(local)}): p50 {percentile(local, 0.5) * 1000:.1f} "
        f"ms, p99 {percentile(local, 0.99) * 1000:.1f} ms"
    )


@contextlib.asynccontextmanager
async def _proxied(pg_url: str) -> AsyncIterator[tuple[TcpProxy, str]]:
    """A TCP proxy in front of the database server, and the database's URL through it."""
    url = make_url(pg_url)
    async with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as proxy:
        yield (
            proxy,
            url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False),
        )


async def _held_generation(replica: Replica, product_id: str) -> str:
    generation_id = await create_generation(replica.stub, product_id)
    await wait_submitted(replica.fake, 1)
    return generation_id


async def test_events_committed_while_a_replica_cannot_listen_arrive_when_it_listens_again(
    tmp_path: Path, pg_url: str
) -> None:
    async with _proxied(pg_url) as (proxy, through_proxy):
        listening = _settings(tmp_path, pg_url, listen_url=through_proxy, listen_probe_interval=0.5)
        async with _replicas(_settings(tmp_path, pg_url), listening) as (owner, other):
            assert proxy.open_connections == 1  # the other replica's listening connection
            generation_id = await _held_generation(owner, await create_product(owner.catalog))
            streams = [other.watch(generation_id), other.watch_all()]
            await _caught_up(owner.stub, [generation_id], {(1, 0): streams[0]}, streams[1:])

            proxy.refuse()
            proxy.cut()

            async def retrying() -> bool:
                return proxy.refused >= 1  # it noticed, and is trying to listen again

            await assert_eventually(retrying)
            # Committed while the other replica listens to nothing: its hint is lost.
            key = await _progress(owner, generation_id, 0.5)
            proxy.accept()
            await _delivered(streams, key)
            assert proxy.connections == 2
            assert sum(s.heartbeats() for s in streams) == 0
            for stream in streams:
                await stream.stop()


async def test_a_silent_listening_connection_is_found_by_its_probe_and_replaced(
    tmp_path: Path, pg_url: str
) -> None:
    async with _proxied(pg_url) as (proxy, through_proxy):
        listening = _settings(tmp_path, pg_url, listen_url=through_proxy, listen_probe_interval=0.5)
        async with _replicas(_settings(tmp_path, pg_url), listening) as (owner, other):
            generation_id = await _held_generation(owner, await create_product(owner.catalog))
            streams = [other.watch(generation_id), other.watch_all()]
            await _caught_up(owner.stub, [generation_id], {(1, 0): streams[0]}, streams[1:])

            # The path dies without a word: the connection stays open, nothing arrives.
            proxy.freeze()
            key = await _progress(owner, generation_id, 0.5)
            await _delivered(streams, key)
            # The probe got no answer: a new connection (and one more carried the probe's
            # cancel request).
            assert proxy.connections >= 2
            assert sum(s.heartbeats() for s in streams) == 0
            for stream in streams:
                await stream.stop()


async def test_a_late_hint_behind_a_local_commit_still_delivers_every_cursor(
    tmp_path: Path, pg_url: str
) -> None:
    async with _proxied(pg_url) as (proxy, through_proxy):
        # Probes far apart: a slow listening connection is not replaced during the test.
        listening = _settings(tmp_path, pg_url, listen_url=through_proxy, listen_probe_interval=60)
        async with _replicas(_settings(tmp_path, pg_url), listening) as (owner, other):
            product_id = await create_product(owner.catalog)
            theirs = await _held_generation(owner, product_id)
            ours = await _held_generation(other, product_id)
            everything = other.watch_all()
            await _caught_up(owner.stub, [theirs, ours], {}, [everything])
            before = len(everything.events())

            proxy.freeze()  # the other replica's hints wait in the proxy
            remote = await _progress(owner, theirs, 0.5)  # cursor before + 1, hint held
            local = await _progress(other, ours, 0.5)  # cursor before + 2, published here
            await _delivered([everything], local)
            proxy.thaw()  # the late hint arrives after the stream moved past its cursor
            await _delivered([everything], remote)
            await everything.stop()

    events = everything.events()
    assert [e.cursor for e in events] == list(range(1, before + 3))
    assert [(e.generation_id, e.sequence) for e in events[before:]] == [remote, local]


async def test_a_replica_ignores_its_own_hints_and_survives_a_malformed_one(
    tmp_path: Path, pg_url: str
) -> None:
    settings = _settings(tmp_path, pg_url)
    async with _replicas(settings, settings) as (owner, other):
        generation_id = await _held_generation(owner, await create_product(owner.catalog))
        watch = other.watch(generation_id)
        await _caught_up(owner.stub, [generation_id], {(1, 0): watch}, [])
        engine = create_engine(settings.database)
        try:
            async with engine.begin() as connection:
                await connection.execute(text("SELECT pg_notify('sartiq_events', 'not a hint')"))
        finally:
            await engine.dispose()

        async def woken() -> bool:
            return None in other.bus.wakes[1:]

        await assert_eventually(woken)  # a hint it cannot read wakes every watcher
        key = await _progress(owner, generation_id, 0.5)
        await _delivered([watch], key)  # and the next real hint still works
        await watch.stop()
    # The owner published its events itself: none of its own hints woke its watchers.
    # Its first LISTEN (nothing to miss then) and the malformed hint: none of its own.
    assert owner.bus.wakes == [None, None]
    assert other.bus.wakes[0] is None
    assert None in other.bus.wakes[1:]  # the malformed one
    assert generation_id in set().union(*(w.get("default") or {} for w in other.bus.wakes if w))


async def test_a_listen_url_that_is_not_postgresql_stops_the_start(
    tmp_path: Path, pg_url: str
) -> None:
    settings = _settings(tmp_path, pg_url, listen_url="sqlite+aiosqlite:///elsewhere.db")
    with pytest.raises(StartupError, match="SARTIQ_DATABASE__LISTEN_URL"):
        async with App(settings, compute=FakeComputeBackend()):
            pass
