"""Replicas on one PostgreSQL database hand generations to each other: cancels, shutdowns.

Two apps share a database and one compute fake that holds every task (as one compute
server would serve both), each with its own name. A cancel sent to the replica that does
not run the generation is recorded for the owner, which carries it out; a replica that
shuts down releases its generations and the other resumes them at once, far inside the
lease, re-attaching their compute tasks instead of submitting them again. A replica with no
workflow free leaves a new generation to the deployment's line, where a replica with
room takes it. Killed and
paused replicas are covered by the process tests (tests/system/test_replica_takeover.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
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
    generate_request,
    wait_submitted,
)
from pg import fresh_database, requires_postgres
from sqlalchemy import text

from sartiq_grpc.sartiq.generation.v1 import enums_pb2
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import DatabaseSettings, OrchestrationSettings, Settings
from server.store.db import create_engine

pytestmark = requires_postgres
LEASE = 30.0  # every hand-over below happens far inside it


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


def _settings(tmp_path: Path, url: str, name: str, **orchestration: Any) -> Settings:
    base = make_settings(tmp_path / name, replica_name=name)
    return base.model_copy(
        update={
            "database": DatabaseSettings(url=url),
            "orchestration": OrchestrationSettings(
                progress_interval=0.0, lease_seconds=LEASE, **orchestration
            ),
        }
    )


async def _owners(url: str) -> dict[str, tuple[str | None, int]]:
    engine = create_engine(DatabaseSettings(url=url))
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, owner, fence FROM generations"))).all()
    finally:
        await engine.dispose()
    return {row.id: (row.owner, row.fence) for row in rows}


@contextlib.asynccontextmanager
async def _replica(
    settings: Settings, fake: FakeComputeBackend
) -> AsyncIterator[tuple[GenerationStub, CatalogStub]]:
    async with (
        App(settings, compute=fake) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        yield GenerationStub(channel), CatalogStub(channel)


async def _status(stub: GenerationStub, generation_id: str) -> int:
    request = pb.GetGenerationRequest(generation_id=generation_id)
    return (await stub.GetGeneration(request)).generation.status


async def test_a_cancel_sent_to_another_replica_is_carried_out_by_the_owner(
    tmp_path: Path, pg_url: str
) -> None:
    fake = FakeComputeBackend(hold=True)
    async with (
        _replica(_settings(tmp_path, pg_url, "a"), fake) as (a, catalog),
        _replica(_settings(tmp_path, pg_url, "b"), fake) as (b, _),
    ):
        product = await create_product(catalog)
        generation_id = await create_generation(a, product)
        await wait_submitted(fake, 1)
        answer = await b.CancelGeneration(pb.CancelGenerationRequest(generation_id=generation_id))
        assert answer.generation.status in (
            enums_pb2.GENERATION_STATUS_CANCELLING,
            enums_pb2.GENERATION_STATUS_CANCELLED,
        )

        async def cancelled() -> bool:
            return await _status(b, generation_id) == enums_pb2.GENERATION_STATUS_CANCELLED

        await assert_eventually(cancelled)
        assert fake.cancelled == list(fake.tasks)  # compute was asked to release it
        owner, fence = (await _owners(pg_url))[generation_id]
        assert (owner, fence) == (None, 0)  # a carried it out (and ended it): b never claimed


async def test_a_replica_that_shuts_down_hands_its_generations_over_at_once(
    tmp_path: Path, pg_url: str
) -> None:
    fake = FakeComputeBackend(hold=True)
    async with _replica(_settings(tmp_path, pg_url, "b"), fake) as (b, _):
        async with _replica(_settings(tmp_path, pg_url, "a"), fake) as (a, catalog):
            product = await create_product(catalog)
            ids = [await create_generation(a, product) for _ in range(3)]
            await wait_submitted(fake, 3)
        # a shut down (SIGTERM): it released its leases, and b claims them at once.

        async def taken() -> bool:
            owners = await _owners(pg_url)
            return all(owners[i] == ("b", 1) for i in ids)

        await assert_eventually(taken, timeout=LEASE / 3)
        for task in list(fake.tasks):
            fake.complete(task)

        async def completed() -> bool:
            statuses = [await _status(b, i) for i in ids]
            return statuses == [enums_pb2.GENERATION_STATUS_COMPLETED] * 3

        await assert_eventually(completed)
        assert len(fake.submitted) == 3  # re-attached by their compute ids, not resubmitted


async def test_a_submit_cut_short_by_a_shutdown_is_found_not_submitted_again(
    tmp_path: Path, pg_url: str
) -> None:
    fake = FakeComputeBackend(hold=True)
    fake.submit_gate = asyncio.Event()  # compute accepts the task; its answer never comes
    async with _replica(_settings(tmp_path, pg_url, "b"), fake) as (b, _):
        async with _replica(_settings(tmp_path, pg_url, "a"), fake) as (a, catalog):
            generation_id = await create_generation(a, await create_product(catalog))
            await wait_submitted(fake, 1)
        # a shut down inside its submit: no compute id was recorded, and b took over.
        (task,) = fake.tasks

        async def attached() -> bool:
            request = pb.GetGenerationRequest(generation_id=generation_id)
            generation = (await b.GetGeneration(request)).generation
            return generation.predictions[0].tasks[0].compute_task_id == task

        await assert_eventually(attached, timeout=LEASE / 3)
        fake.complete(task)

        async def completed() -> bool:
            return await _status(b, generation_id) == enums_pb2.GENERATION_STATUS_COMPLETED

        await assert_eventually(completed)
        assert len(fake.submit_calls) == 1  # b found it by its key instead


async def test_a_full_replica_leaves_new_generations_to_the_deployments_line(
    tmp_path: Path, pg_url: str
) -> None:
    fake = FakeComputeBackend(hold=True)
    # One compute slot and two workflows per replica (the second waits for the slot).
    small = {"max_tasks_in_flight": 1}
    async with (
        _replica(_settings(tmp_path, pg_url, "a", **small), fake) as (a, catalog),
        _replica(_settings(tmp_path, pg_url, "b", **small), fake) as (b, _),
    ):
        product = await create_product(catalog)
        running = [await create_generation(a, product) for _ in range(2)]
        await wait_submitted(fake, 1)
        # a is full: the next goes to the line, and b, idle, takes it at once.
        taken = await create_generation(a, product)
        await wait_submitted(fake, 2)
        owners = await _owners(pg_url)
        assert [owners[g][0] for g in running] == ["a", "a"]
        assert owners[taken] == ("b", 1)
        # b's second workflow fills it: the next ones wait in the line, first, second.
        await create_generation(b, product)
        first = await a.CreateGenerateGeneration(generate_request(product))
        second = await b.CreateGenerateGeneration(generate_request(product))
        assert (first.generation.queue_position, second.generation.queue_position) == (1, 2)
        request = pb.GetGenerationRequest(generation_id=second.generation.id)
        assert (await a.GetGeneration(request)).generation.queue_position == 2
        # A workflow of a ends: a takes the first in line.
        fake.complete(next(iter(fake.tasks)))

        async def moved_on() -> bool:
            return (await _owners(pg_url))[first.generation.id][0] == "a"

        # Woken by the workflow's end, not by its next round (every third of the lease).
        await assert_eventually(moved_on, timeout=LEASE / 10)
        assert (await a.GetGeneration(request)).generation.queue_position == 1
