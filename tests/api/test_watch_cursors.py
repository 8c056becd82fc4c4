"""WatchGenerations cursors count one organization's events: 1, 2, 3..., across restarts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from conftest import make_settings
from helpers import (
    CatalogStub,
    GenerationStub,
    create_product,
    field_violations,
    generate_request,
    wait_terminal,
)
from pg import fresh_database, requires_postgres

from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from sartiq_grpc.sartiq.generation.v1 import resources_pb2
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ApiKey, AuthSettings, DatabaseSettings, ServerSettings, Settings

KEYS = {"org-a": "tenant-a-key-0123456789", "org-b": "tenant-b-key-0123456789"}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=requires_postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The database URL of one test: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'sartiq.db'}"
        return
    async with fresh_database() as url:
        yield url


def _auth(org: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[org]}"),)


def _settings(tmp_path: Path, database: str) -> Settings:
    keys = tuple(ApiKey(organization=org, key=key) for org, key in KEYS.items())
    return make_settings(tmp_path).model_copy(
        update={
            "auth": AuthSettings(api_keys=keys),
            "database": DatabaseSettings(url=database),
            "server": ServerSettings(port=0, grace_period=1.0, heartbeat_interval=0.2),
        }
    )


@asynccontextmanager
async def _serving(settings: Settings) -> AsyncIterator[grpc.aio.Channel]:
    async with (
        App(settings, compute=FakeComputeBackend()) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        yield channel


async def _interleave(channel: grpc.aio.Channel, products: dict[str, str], rounds: int) -> None:
    """Generations of both tenants at once, so their events are committed interleaved."""
    stub = GenerationStub(channel)
    created = []
    for _ in range(rounds):
        for org, product in products.items():
            response = await stub.CreateGenerateGeneration(
                generate_request(product, batch=2), metadata=_auth(org)
            )
            created.append((org, response.generation.id))
    for org, generation_id in created:
        await wait_terminal(stub, generation_id, metadata=_auth(org))


async def _stored_count(channel: grpc.aio.Channel, org: str) -> int:
    """How many events the organization has: the last sequences of its generations."""
    listed = await GenerationStub(channel).ListGenerations(
        pb.ListGenerationsRequest(page_size=100), metadata=_auth(org)
    )
    return sum(g.last_event_sequence for g in listed.generations)


async def _events(
    channel: grpc.aio.Channel, org: str, after: int, count: int
) -> tuple[list[resources_pb2.GenerationEvent], pb.WatchGenerationsResponse]:
    """``count`` events of the stream from ``after``, and the item that follows them."""
    call = GenerationStub(channel).WatchGenerations(
        pb.WatchGenerationsRequest(after_cursor=after), metadata=_auth(org)
    )
    events: list[resources_pb2.GenerationEvent] = []
    try:
        async for item in call:
            if len(events) == count:
                return events, item
            if item.HasField("event"):
                events.append(item.event)
    finally:
        call.cancel()
    raise AssertionError("the stream ended")


async def test_each_organization_numbers_its_own_events(tmp_path: Path, database: str) -> None:
    settings = _settings(tmp_path, database)
    async with _serving(settings) as channel:
        catalog = CatalogStub(channel)
        products = {org: await create_product(catalog, metadata=_auth(org)) for org in KEYS}
        await _interleave(channel, products, rounds=3)
        counts = {org: await _stored_count(channel, org) for org in KEYS}
        for org, count in counts.items():
            events, after = await _events(channel, org, 0, count)
            assert [e.cursor for e in events] == list(range(1, count + 1))
            assert {e.generation_id for e in events} == {
                g.id
                for g in (
                    await GenerationStub(channel).ListGenerations(
                        pb.ListGenerationsRequest(), metadata=_auth(org)
                    )
                ).generations
            }
            # Idle now: the heartbeat says where the stream has looked up to.
            assert after.heartbeat.cursor == count
            # Resuming from any cursor gives the rest, nothing twice, nothing missed.
            middle = count // 2
            rest, _ = await _events(channel, org, middle, count - middle)
            assert rest == events[middle:]
            # A cursor this organization never had is refused, not waited for.
            call = GenerationStub(channel).WatchGenerations(
                pb.WatchGenerationsRequest(after_cursor=count + 1),
                metadata=_auth(org),
                timeout=10,
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.read()
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "after_cursor" in field_violations(caught.value)

    # After a restart the numbering goes on where each organization left it.
    async with _serving(settings) as channel:
        await _interleave(channel, products, rounds=1)
        for org, before in counts.items():
            total = await _stored_count(channel, org)
            assert total > before
            events, _ = await _events(channel, org, before, total - before)
            assert [e.cursor for e in events] == list(range(before + 1, total + 1))
