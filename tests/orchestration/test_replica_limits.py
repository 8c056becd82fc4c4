"""Admission limits of the whole deployment: replicas on one PostgreSQL database share them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_settings
from google.rpc import error_details_pb2
from helpers import (
    CatalogStub,
    GenerationStub,
    assert_eventually,
    create_product,
    error_info,
    generate_request,
    rich_status,
    wait_submitted,
    wait_terminal,
)
from pg import fresh_database, requires_postgres
from procs import ServerProcess
from sqlalchemy import text

from sartiq_grpc.sartiq.generation.v1 import enums_pb2, resources_pb2
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import (
    ApiKey,
    AuthSettings,
    DatabaseSettings,
    OrchestrationSettings,
    ServerSettings,
)
from server.store.db import create_engine

pytestmark = requires_postgres

KEYS = {"org-a": "tenant-a-key-0123456789", "org-b": "tenant-b-key-0123456789"}
Metadata = tuple[tuple[str, str], ...]


def auth(org: str) -> Metadata:
    return (("authorization", f"Bearer {KEYS[org]}"),)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


@dataclass
class Replicas:
    """Replicas on one database, each with its own fake compute that holds every task."""

    url: str
    stubs: list[GenerationStub]
    computes: list[FakeComputeBackend]
    products: dict[str, str]

    async def create(self, replica: int, org: str, request_id: str = "") -> Any:
        request = generate_request(self.products[org])
        request.request_id = request_id
        return await self.stubs[replica].CreateGenerateGeneration(request, metadata=auth(org))

    async def burst(self, orgs: list[str]) -> tuple[list[str], list[grpc.aio.AioRpcError]]:
        """One create per entry of ``orgs``, all at once, spread over the replicas in turn."""
        answers = await asyncio.gather(
            *(self.create(n % len(self.stubs), org) for n, org in enumerate(orgs)),
            return_exceptions=True,
        )
        admitted = [
            a.generation.id for a in answers if isinstance(a, pb.CreateGenerateGenerationResponse)
        ]
        refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
        assert len(admitted) + len(refused) == len(orgs)  # nothing else (no INTERNAL)
        return admitted, refused

    async def listed(self, replica: int, org: str) -> list[resources_pb2.Generation]:
        response = await self.stubs[replica].ListGenerations(
            pb.ListGenerationsRequest(page_size=100), metadata=auth(org)
        )
        return list(response.generations)

    async def assert_counts_match(self) -> dict[str, int]:
        """The stored counts equal the stored live generations; returns them."""
        counted, live = await counts(self.url)
        assert counted == live
        return counted


async def counts(url: str) -> tuple[dict[str, int], dict[str, int]]:
    """(the counts kept, the live generations stored) by organization, "" for all."""
    engine = create_engine(DatabaseSettings(url=url))
    try:
        async with engine.connect() as conn:
            kept = (await conn.execute(text("SELECT organization, live FROM live_counts"))).all()
            live = (
                await conn.execute(
                    text(
                        "SELECT organization, count(*) AS live FROM generations WHERE status"
                        " IN ('PENDING', 'PROCESSING', 'CANCELLING') GROUP BY organization"
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    stored = {row.organization: row.live for row in live}
    stored[""] = sum(stored.values())
    return {row.organization: row.live for row in kept if row.live or not row.organization}, stored


@asynccontextmanager
async def replicas(
    tmp_path: Path,
    url: str,
    count: int,
    *,
    server: ServerSettings | None = None,
    **orchestration: Any,
) -> AsyncIterator[Replicas]:
    """``count`` in-process replicas of the service on the database at ``url``."""
    keys = tuple(ApiKey(organization=org, key=key) for org, key in KEYS.items())
    settings = make_settings(tmp_path).model_copy(
        update={
            "auth": AuthSettings(api_keys=keys),
            "database": DatabaseSettings(url=url),
            "orchestration": OrchestrationSettings(progress_interval=0.0, **orchestration),
            **({"server": server} if server else {}),
        }
    )
    async with AsyncExitStack() as stack:
        stubs, computes = [], []
        for _ in range(count):  # one after the other: each migrates the database at start
            compute = FakeComputeBackend(hold=True)
            app = await stack.enter_async_context(App(settings, compute=compute))
            channel = await stack.enter_async_context(
                grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
            )
            stubs.append(GenerationStub(channel))
            computes.append(compute)
        catalog = CatalogStub(channel)
        products = {
            org: await create_product(catalog, f"{org} coat", metadata=auth(org)) for org in KEYS
        }
        yield Replicas(url, stubs, computes, products)


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    retry = error_details_pb2.RetryInfo()
    (packed,) = [d for d in rich_status(error).details if d.Is(retry.DESCRIPTOR)]
    packed.Unpack(retry)
    return float(retry.retry_delay.ToTimedelta().total_seconds())


def assert_refused(errors: list[grpc.aio.AioRpcError], reason: str) -> None:
    delays = set()
    for error in errors:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(error).reason == reason
        delays.add(retry_delay(error))
    # retry_after_seconds 2 +/- its jitter (50%), drawn per refusal, as a single process does
    assert all(1.0 <= delay <= 3.0 for delay in delays), delays
    if len(errors) >= 5:
        assert len(delays) > 1, delays


@pytest.mark.parametrize("count", [2, 3])
async def test_the_live_cap_holds_across_replicas(tmp_path: Path, pg_url: str, count: int) -> None:
    async with replicas(tmp_path, pg_url, count, max_live_per_organization=10) as r:
        # The other tenant's creates go in the same bursts, batched with refused ones.
        admitted, refused = await r.burst(["org-a"] * 15 * count + ["org-b"] * 3)
        assert len(admitted) == 10 + 3
        assert len(refused) == 15 * count - 10
        assert_refused(refused, "ORGANIZATION_LIMIT")
        for replica in range(count):
            listed = await r.listed(replica, "org-a")
            assert len(listed) == 10
            assert {g.id for g in listed} < set(admitted)
        assert await r.assert_counts_match() == {"": 13, "org-a": 10, "org-b": 3}


@pytest.mark.parametrize("count", [2, 3])
async def test_the_queue_bound_holds_across_replicas(
    tmp_path: Path, pg_url: str, count: int
) -> None:
    async with replicas(tmp_path, pg_url, count, max_queued_generations=10) as r:
        admitted, refused = await r.burst(["org-a", "org-b"] * 8 * count)
        assert len(admitted) == 10
        assert len(refused) == 16 * count - 10
        assert_refused(refused, "QUEUE_FULL")
        counted = await r.assert_counts_match()
        assert counted[""] == 10


async def _compute_of(r: Replicas, created: Any) -> tuple[FakeComputeBackend, str]:
    """The fake compute holding the created generation's task, and the task's compute id."""
    key = created.generation.predictions[0].tasks[0].id
    for compute in r.computes:
        for compute_id, task in compute.tasks.items():
            if task.request.idempotency_key == key:
                return compute, compute_id
    raise AssertionError("the task did not reach compute")


async def test_ending_a_generation_frees_its_place_across_replicas(
    tmp_path: Path, pg_url: str
) -> None:
    async with replicas(tmp_path, pg_url, 2, max_live_per_organization=3) as r:
        created = [await r.create(n % 2, "org-a") for n in range(3)]
        await wait_submitted(r.computes[0], 2)
        await wait_submitted(r.computes[1], 1)
        endings = {
            "complete": enums_pb2.GENERATION_STATUS_COMPLETED,
            "fail": enums_pb2.GENERATION_STATUS_FAILED,
            "cancel": enums_pb2.GENERATION_STATUS_CANCELLED,
        }
        for (how, status), one in zip(endings.items(), created, strict=True):
            compute, compute_id = await _compute_of(r, one)
            owner = r.computes.index(compute)
            if how == "complete":
                compute.complete(compute_id)
            elif how == "fail":
                compute.fail(compute_id, "validation", "the prompt is refused")
            else:
                await r.stubs[owner].CancelGeneration(
                    pb.CancelGenerationRequest(generation_id=one.generation.id),
                    metadata=auth("org-a"),
                )
            done = await wait_terminal(r.stubs[owner], one.generation.id, metadata=auth("org-a"))
            assert done.status == status
            assert (await r.assert_counts_match())["org-a"] == 2
            # Exactly one place came free, whichever replica a create reaches.
            again, still = await r.burst(["org-a"] * 4)
            assert (len(again), len(still)) == (1, 3)
            assert (await r.assert_counts_match())["org-a"] == 3


async def test_the_counts_hold_across_a_restart(tmp_path: Path, pg_url: str) -> None:
    # A short lease, so the restarted replicas may claim what the stopped ones held.
    limits: dict[str, Any] = {"max_live_per_organization": 4, "lease_seconds": 1.0}
    async with replicas(tmp_path, pg_url, 2, **limits) as r:
        created = [(await r.create(n % 2, "org-a")).generation.id for n in range(4)]
        assert await r.assert_counts_match() == {"": 4, "org-a": 4}
    await assert_eventually(lambda: _leases_expired(pg_url), timeout=10)
    async with replicas(tmp_path / "again", pg_url, 2, **limits) as r:
        # The first replica to start resumed all four: they count as before.
        assert await r.assert_counts_match() == {"": 4, "org-a": 4}
        admitted, refused = await r.burst(["org-a"] * 4)
        assert admitted == []
        assert_refused(refused, "ORGANIZATION_LIMIT")
        for generation_id in created:
            await r.stubs[0].CancelGeneration(
                pb.CancelGenerationRequest(generation_id=generation_id), metadata=auth("org-a")
            )
        for generation_id in created:
            done = await wait_terminal(r.stubs[1], generation_id, metadata=auth("org-a"))
            assert done.status == enums_pb2.GENERATION_STATUS_CANCELLED
        assert await r.assert_counts_match() == {"": 0}
        admitted, refused = await r.burst(["org-a"] * 6)
        assert (len(admitted), len(refused)) == (4, 2)


async def _leases_expired(url: str) -> bool:
    engine = create_engine(DatabaseSettings(url=url))
    try:
        async with engine.connect() as conn:
            held = await conn.execute(
                text("SELECT count(*) FROM generations WHERE lease_expires_at >= :now"),
                {"now": datetime.now(UTC).replace(tzinfo=None)},
            )
            return held.scalar() == 0
    finally:
        await engine.dispose()


async def test_retries_of_one_request_take_one_place_across_replicas(
    tmp_path: Path, pg_url: str
) -> None:
    async with replicas(tmp_path, pg_url, 2, max_live_per_organization=10) as r:
        # Ten requests, each sent three times to each replica at once: whichever copy
        # commits first takes the place, and every other copy answers with its
        # generation, even when that took the organization's last place.
        calls = [(replica, f"request-{n}") for n in range(10) for replica in (0, 1) * 3]
        answers = await asyncio.gather(*(r.create(rep, "org-a", rid) for rep, rid in calls))
        by_request: dict[str, set[str]] = {}
        for (_, request_id), answer in zip(calls, answers, strict=True):
            by_request.setdefault(request_id, set()).add(answer.generation.id)
        assert all(len(ids) == 1 for ids in by_request.values())
        assert await r.assert_counts_match() == {"": 10, "org-a": 10}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await r.create(1, "org-a", "request-10")  # the eleventh request
        assert_refused([caught.value], "ORGANIZATION_LIMIT")
        again = await r.create(1, "org-a", "request-3")  # a late retry still answers
        assert {again.generation.id} == by_request["request-3"]


async def test_the_call_rate_holds_across_replicas(tmp_path: Path, pg_url: str) -> None:
    # Setting up takes one call per organization (its product); a token comes back
    # every 20 s, so none does during the test.
    server = ServerSettings(port=0, grace_period=1.0, rate_limit=0.05, rate_burst=5)
    async with replicas(tmp_path, pg_url, 3, server=server) as r:
        answers = await asyncio.gather(
            *(
                r.stubs[n % 3].ListGenerations(pb.ListGenerationsRequest(), metadata=auth("org-a"))
                for n in range(9)
            ),
            return_exceptions=True,
        )
        refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
        assert len(answers) - len(refused) == 4  # the burst of 5, less the product's call
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(error).reason == "RATE_LIMITED"
            assert 15.0 < retry_delay(error) <= 20.0
        for stub in r.stubs:  # the other organization has its own bucket
            await stub.ListGenerations(pb.ListGenerationsRequest(), metadata=auth("org-b"))


async def test_the_live_cap_holds_across_replica_processes(tmp_path: Path, pg_url: str) -> None:
    settings = {
        "DATABASE__URL": pg_url,
        "ORCHESTRATION__MAX_LIVE_PER_ORGANIZATION": "10",
        "LOG_LEVEL": "WARNING",
    }
    processes = []
    for n in range(3):
        workdir = tmp_path / f"replica-{n}"
        workdir.mkdir()
        processes.append(ServerProcess.with_fake_compute(workdir, hold=True, **settings))
    try:
        for process in processes:  # one after the other: each migrates first
            await process.start()
        async with AsyncExitStack() as stack:
            channels = [
                await stack.enter_async_context(grpc.aio.insecure_channel(p.target))
                for p in processes
            ]
            stubs = [GenerationStub(channel) for channel in channels]
            product = await create_product(CatalogStub(channels[0]), "coat")
            answers = await asyncio.gather(
                *(
                    stubs[n % 3].CreateGenerateGeneration(generate_request(product))
                    for n in range(30)
                ),
                return_exceptions=True,
            )
            refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
            assert len(answers) - len(refused) == 10
            assert_refused(refused, "ORGANIZATION_LIMIT")
            counted, live = await counts(pg_url)
            assert counted == live == {"": 10, "default": 10}
    finally:
        for process in processes:
            await process.stop()
