"""Wake-up hints between replicas: bounded payloads, hostile ones read as "anything"."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import assert_eventually
from pg import fresh_database, requires_postgres
from test_cursor_race import _replicas

from server.config import DatabaseSettings
from server.store import hints
from server.store.events import EventBus, LaggedError
from server.store.listener import EventListener, asyncpg_connector
from server.store.migrate import upgrade_to_head


def _rows(organization: str, generations: int, sequence: int = 3) -> list[dict[str, Any]]:
    return [
        {"organization": organization, "generation_id": str(uuid.uuid4()), "sequence": sequence}
        for _ in range(generations)
    ]


def test_a_hint_names_each_generation_with_its_last_sequence() -> None:
    gid = str(uuid.uuid4())
    rows = [
        {"organization": "org-a", "generation_id": gid, "sequence": 4},
        {"organization": "org-a", "generation_id": gid, "sequence": 5},
        *_rows("org-b", 1, sequence=1),
    ]
    hint = hints.decode(hints.encode("replica-1", rows))
    assert hint is not None
    assert hint.origin == "replica-1"
    assert hint.organizations is not None
    assert hint.organizations["org-a"] == {gid: 5}
    assert list(hint.organizations) == ["org-a", "org-b"]


def test_a_hint_too_large_names_organizations_then_nothing() -> None:
    many_generations = _rows("org-a", 500) + _rows("org-b", 2)
    payload = hints.encode("replica-1", many_generations)
    assert len(payload.encode()) <= hints.MAX_HINT_BYTES
    hint = hints.decode(payload)
    assert hint is not None
    assert hint.organizations == {"org-a": None, "org-b": None}  # any of their generations

    many_organizations = [row for n in range(200) for row in _rows(f"org-{n:03}-{'x' * 40}", 1)]
    payload = hints.encode("replica-1", many_organizations)
    assert len(payload.encode()) <= hints.MAX_HINT_BYTES
    hint = hints.decode(payload)
    assert hint is not None
    assert hint.organizations is None  # anything at all


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "null",
        "[]",
        "42",
        '{"organizations": {}}',  # no origin
        '{"origin": 7}',
        '{"origin": "x", "organizations": {"org": {"g": "seven"}}}',
        '{"origin": "x", "organizations": ["org"]}',
        '{"origin": "' + "x" * 300 + '"}',
    ],
)
def test_a_payload_that_is_not_a_hint_is_refused(payload: str) -> None:
    assert hints.decode(payload) is None  # the listener then wakes every watcher


class RecordingBus(EventBus):
    def __init__(self) -> None:
        super().__init__()
        self.wakes: list[Any] = []

    def wake(self, organizations: Any) -> None:
        self.wakes.append(organizations)
        super().wake(organizations)


@pytest.fixture
async def database() -> AsyncIterator[DatabaseSettings]:
    async with fresh_database() as url:
        settings = DatabaseSettings(url=url)
        await upgrade_to_head(settings)
        yield settings


@requires_postgres
async def test_a_commit_of_hundreds_of_generations_wakes_their_organization(
    database: DatabaseSettings,
) -> None:
    bus = RecordingBus()
    listener = EventListener(
        asyncpg_connector(database.url, timeout=10), bus, origin="elsewhere", probe_interval=5
    )
    await listener.start()
    try:
        assert listener.connected
        async with _replicas(database, None) as (replica,):
            ids = [await replica.generation("org-a") for _ in range(300)]
            writes = [replica.write(("org-a", generation_id)) for generation_id in ids]
            await asyncio.gather(*writes)  # a few batches, each naming many generations

            async def woken() -> bool:
                return _named(bus, "org-a") >= 1

            await assert_eventually(woken)
    finally:
        await listener.shutdown()
    assert bus.wakes[0] is None  # its LISTEN
    assert all(w is not None and set(w) == {"org-a"} for w in bus.wakes[1:])
    assert any(w["org-a"] is None for w in bus.wakes[1:])  # too many to name one by one


def _named(bus: RecordingBus, organization: str) -> int:
    return sum(1 for w in bus.wakes if w is not None and organization in w)


async def _lagging(sub: Any) -> bool:
    """Whether the subscription's watcher is sent back to the store (without waiting)."""
    try:
        await sub.next(0)
    except LaggedError:
        return True
    return False


async def test_a_wake_up_sends_only_the_watchers_concerned_back_to_the_store() -> None:
    bus = EventBus()
    one, two = str(uuid.uuid4()), str(uuid.uuid4())
    watching_one = bus.subscribe("org-a", one)
    watching_two = bus.subscribe("org-a", two)
    elsewhere = bus.subscribe("org-b", str(uuid.uuid4()))
    org_a = bus.subscribe_organization("org-a")
    org_b = bus.subscribe_organization("org-b")
    subs = [watching_one, watching_two, elsewhere, org_a, org_b]

    watching_one.seen = 5  # that watcher has read up to sequence 5 already
    bus.wake({"org-a": {one: 5, two: 1}})
    assert [await _lagging(s) for s in subs] == [False, True, False, True, False]

    bus.wake({"org-a": None})  # any generation of org-a
    assert [await _lagging(s) for s in subs] == [True, True, False, True, False]

    bus.wake(None)  # anything
    assert [await _lagging(s) for s in subs] == [True] * 5


@requires_postgres
async def test_the_listener_connects_with_options_only_sqlalchemy_understands(
    database: DatabaseSettings,
) -> None:
    url = f"{database.url}?prepared_statement_cache_size=0"  # as set for PgBouncer
    listener = EventListener(
        asyncpg_connector(url, timeout=10), EventBus(), origin="here", probe_interval=5
    )
    await listener.start()
    try:
        assert listener.connected
    finally:
        await listener.shutdown()
    assert not listener.connected
