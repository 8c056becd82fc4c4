"""The same schema and the same end-to-end path on PostgreSQL, when a server is configured.

Set SARTIQ_TEST_POSTGRES_URL (e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test);
each test creates and drops its own database next to that one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import make_settings
from helpers import (
    CatalogStub,
    GenerationStub,
    create_product,
    generate_request,
    schema_diff,
    wait_terminal,
)
from pg import fresh_database, requires_postgres

from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import DatabaseSettings
from server.store.db import create_engine
from server.store.migrate import upgrade_to_head

pytestmark = requires_postgres


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


async def test_migrated_schema_equals_models_on_postgres(pg_url: str) -> None:
    settings = DatabaseSettings(url=pg_url)
    engine = create_engine(settings)
    try:
        await upgrade_to_head(settings)
        async with engine.connect() as conn:
            assert await conn.run_sync(schema_diff) == []
    finally:
        await engine.dispose()


async def test_generation_end_to_end_on_postgres(pg_url: str, tmp_path: Path) -> None:
    base = make_settings(tmp_path)
    settings = base.model_copy(update={"database": DatabaseSettings(url=pg_url)})
    async with (
        App(settings, compute=FakeComputeBackend()) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        catalog = CatalogStub(channel)
        stub = GenerationStub(channel)
        product_id = await create_product(catalog, "coat", colour=(9, 9, 9))
        created = await stub.CreateGenerateGeneration(generate_request(product_id, batch=8))
        done = await wait_terminal(stub, created.generation.id)
        call = stub.WatchGeneration(
            generation_service_pb2.WatchGenerationRequest(generation_id=created.generation.id)
        )
        sequences = [item.event.sequence async for item in call if item.HasField("event")]
    assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED
    assert done.prediction_counts.completed_count == 8
    # Eight predictions wrote concurrently without a process-wide lock: the row lock
    # alone kept the sequence gap-free.
    assert sequences == list(range(1, done.last_event_sequence + 1))


async def test_two_replicas_make_one_generation_of_one_request_id(
    pg_url: str, tmp_path: Path
) -> None:
    base = make_settings(tmp_path)
    settings = base.model_copy(update={"database": DatabaseSettings(url=pg_url)})
    async with (
        App(settings, compute=FakeComputeBackend()) as one,
        App(settings, compute=FakeComputeBackend()) as two,
        grpc.aio.insecure_channel(f"127.0.0.1:{one.port}") as first,
        grpc.aio.insecure_channel(f"127.0.0.1:{two.port}") as second,
    ):
        product_id = await create_product(CatalogStub(first), "coat")
        request = generate_request(product_id)
        request.request_id = "one-key"
        stubs = [GenerationStub(first), GenerationStub(second)] * 10
        answers = await asyncio.gather(*(s.CreateGenerateGeneration(request) for s in stubs))
        ids = {a.generation.id for a in answers}
        assert len(ids) == 1
        for stub in stubs[:2]:
            listed = await stub.ListGenerations(generation_service_pb2.ListGenerationsRequest())
            assert [g.id for g in listed.generations] == list(ids)
        done = await wait_terminal(GenerationStub(first), ids.pop())
    assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED
