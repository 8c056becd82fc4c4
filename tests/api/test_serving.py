"""Serving replicas: connections that age out, page tokens every replica accepts, one SQLite owner.

Each test runs real servers on port 0 and reaches them through the Python client or
real stubs; the PostgreSQL ones get a database of their own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_settings
from helpers import (
    CatalogStub,
    assert_eventually,
    field_violations,
    png_bytes,
    wait_submitted,
    watch_all,
)
from pg import fresh_database, requires_postgres
from pydantic import SecretStr

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2
from sartiq_grpc.sartiq.generation.v1 import resources_pb2
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import DatabaseSettings, Settings
from server.domain.errors import StartupError
from server.store.db import create_engine
from server.store.migrate import upgrade_to_head
from server.store.secrets import PAGE_TOKENS, shared_secret

# A connection's age before the server sends GOAWAY, and the grace after it (seconds).
AGE = {"max_connection_age": 0.5, "max_connection_age_grace": 0.2}


async def _create_products(catalog: CatalogStub, count: int) -> None:
    for n in range(count):
        await catalog.CreateProduct(
            catalog_service_pb2.CreateProductRequest(
                name=f"p{n}",
                reference_images=[catalog_service_pb2.ImageInput(data=png_bytes((n, 9, 9)))],
            )
        )


async def _page(catalog: CatalogStub, token: str = "") -> tuple[list[str], str]:
    """One product per page: the names on it and the next page's token."""
    response = await catalog.ListProducts(
        catalog_service_pb2.ListProductsRequest(page_size=1, page_token=token)
    )
    return [p.name for p in response.products], response.next_page_token


async def _page_token_refused(catalog: CatalogStub, token: str) -> bool:
    try:
        await _page(catalog, token)
    except grpc.aio.AioRpcError as error:
        return error.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in (
            field_violations(error)
        )
    return False


async def test_a_second_app_on_the_same_sqlite_file_is_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    other = settings.model_copy(
        update={"media": settings.media.model_copy(update={"artifact_dir": tmp_path / "b"})}
    )
    async with App(settings, compute=FakeComputeBackend()):
        with pytest.raises(StartupError, match="another server process") as refused:
            async with App(other, compute=FakeComputeBackend()):
                pass
        assert "sartiq.db.lock" in str(refused.value)
        assert "PostgreSQL" in str(refused.value)
    # The first one's lock ends with it: the file serves again.
    async with App(other, compute=FakeComputeBackend()) as again:
        assert again.port > 0


@asynccontextmanager
async def _catalog(settings: Settings) -> AsyncIterator[CatalogStub]:
    async with (
        App(settings, compute=FakeComputeBackend()) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        yield CatalogStub(channel)


async def test_page_tokens_survive_a_restart_and_a_configured_secret_wins(
    tmp_path: Path,
) -> None:
    shared = make_settings(tmp_path)
    configured = make_settings(tmp_path, page_token_secret=SecretStr("configured-secret-16"))
    async with _catalog(shared) as catalog:
        await _create_products(catalog, 3)
        first, by_database = await _page(catalog)
    async with _catalog(configured) as catalog:
        # Signed with the configured secret, not the database's.
        assert await _page_token_refused(catalog, by_database)
        _, by_setting = await _page(catalog)
    async with _catalog(shared) as catalog:
        # A token from before the restart still works: the key is in the database.
        second, _ = await _page(catalog, by_database)
        assert await _page_token_refused(catalog, by_setting)
    assert first != second
    assert len(first) == len(second) == 1


@pytest.fixture
async def pg_settings(tmp_path: Path) -> AsyncIterator[Settings]:
    async with fresh_database() as url:
        settings = make_settings(tmp_path)
        yield settings.model_copy(update={"database": DatabaseSettings(url=url)})


@requires_postgres
async def test_a_page_token_of_one_replica_is_accepted_by_another(pg_settings: Settings) -> None:
    async with (
        App(pg_settings, compute=FakeComputeBackend()) as one,
        App(pg_settings, compute=FakeComputeBackend()) as two,
        grpc.aio.insecure_channel(f"127.0.0.1:{one.port}") as first,
        grpc.aio.insecure_channel(f"127.0.0.1:{two.port}") as second,
    ):
        await _create_products(CatalogStub(first), 3)
        names, token = await _page(CatalogStub(first))
        following, token = await _page(CatalogStub(second), token)
        last, end = await _page(CatalogStub(first), token)
    assert len({*names, *following, *last}) == 3
    assert end == ""


@requires_postgres
async def test_replicas_starting_at_once_agree_on_one_secret(pg_settings: Settings) -> None:
    await upgrade_to_head(pg_settings.database)
    engines = [create_engine(pg_settings.database) for _ in range(8)]
    try:
        for engine in engines:  # connected beforehand, so that the transactions overlap
            async with engine.connect():
                pass
        secrets = await asyncio.gather(*(shared_secret(e, PAGE_TOKENS) for e in engines))
        again = await shared_secret(engines[0], PAGE_TOKENS)
    finally:
        await asyncio.gather(*(e.dispose() for e in engines))
    assert len(set(secrets)) == 1
    assert again == secrets[0]
    assert len(again) == 32


async def test_calls_go_on_as_connections_age_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sartiq.access")

    def peers() -> set[str]:
        return {getattr(r, "peer", "") for r in caplog.records if r.name == "sartiq.access"}

    async with (
        App(make_settings(tmp_path, **AGE), compute=FakeComputeBackend()) as app,
        SartiqClient(f"dns:///127.0.0.1:{app.port}") as client,
    ):

        async def reconnected_twice() -> bool:
            await client.list()  # never fails: a GOAWAY leaves calls to a new connection
            return len(peers()) >= 3

        await assert_eventually(reconnected_twice, timeout=20)


async def test_the_client_spreads_calls_over_every_address(tmp_path: Path) -> None:
    # Two servers, each with a product of its own name: which one answered shows in the list.
    async with (
        App(make_settings(tmp_path / "a"), compute=FakeComputeBackend()) as a,
        App(make_settings(tmp_path / "b"), compute=FakeComputeBackend()) as b,
    ):
        for app, name in ((a, "from-a"), (b, "from-b")):
            async with SartiqClient(f"127.0.0.1:{app.port}") as one:
                await one.create_entity("product", name, images=[png_bytes((4, 4, 4))])
        seen: set[str] = set()
        async with SartiqClient(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}") as client:

            async def both_answered() -> bool:
                listed = await client.catalog.ListProducts(
                    catalog_service_pb2.ListProductsRequest()
                )
                seen.update(p.name for p in listed.products)
                return seen == {"from-a", "from-b"}

            await assert_eventually(both_answered, timeout=20)


async def _until_terminal(
    events: AsyncIterator[resources_pb2.GenerationEvent],
    generation_id: str,
    into: list[resources_pb2.GenerationEvent],
) -> None:
    async for event in events:
        if event.generation_id == generation_id:
            into.append(event)
            if event.terminal:
                return


async def test_watches_resume_after_their_connection_ages_out(tmp_path: Path) -> None:
    fake = FakeComputeBackend(hold=True)
    async with (
        App(make_settings(tmp_path, **AGE), compute=fake) as app,
        SartiqClient(f"dns:///127.0.0.1:{app.port}") as client,
    ):
        product = await client.create_entity("product", "coat", images=[png_bytes((1, 2, 3))])
        generation = await client.generate(
            product_id=product.id, shot_type_string="front", width=64, height=64
        )
        one: list[resources_pb2.GenerationEvent] = []
        every: list[resources_pb2.GenerationEvent] = []
        cuts: list[str] = []
        cuts_all: list[str] = []
        watching = asyncio.gather(
            _until_terminal(client.watch(generation.id, on_wait=cuts.append), generation.id, one),
            _until_terminal(
                client.watch_generations(after_cursor=0, on_wait=cuts_all.append),
                generation.id,
                every,
            ),
        )
        await wait_submitted(fake, 1)
        (compute_id,) = fake.tasks
        steps = iter(range(1, 1000))

        async def both_cut_twice() -> bool:
            # Progress events keep flowing while the connections age out under them.
            fake.progress(compute_id, next(steps) / 1000)
            return len(cuts) >= 2 and len(cuts_all) >= 2

        await assert_eventually(both_cut_twice, timeout=30, interval=0.05)
        fake.complete(compute_id)
        await asyncio.wait_for(watching, 30)
        stored = await watch_all(client.generations, generation.id)
    assert all("max connection age" in why for why in cuts + cuts_all), cuts + cuts_all
    assert [e.sequence for e in one] == list(range(1, len(one) + 1))
    assert [_wire(e) for e in one] == [_wire(e) for e in stored]
    assert [e.cursor for e in every] == list(range(1, len(every) + 1))
    assert [e.sequence for e in every] == [e.sequence for e in one]


def _wire(message: Any) -> bytes:
    data: bytes = message.SerializeToString(deterministic=True)
    return data
