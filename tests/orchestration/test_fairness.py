"""Limits per tenant: fair admission between organizations, a live cap, a call rate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

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
    png_bytes,
    rich_status,
    wait_submitted,
    wait_terminal,
)

from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2 as art
from sartiq_grpc.sartiq.generation.v1 import (
    artifact_service_pb2_grpc,
    enums_pb2,
    resources_pb2,
)
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ApiKey, AuthSettings, OrchestrationSettings, ServerSettings
from server.domain.limits import TokenBuckets

KEYS = {"org-a": "tenant-a-key-0123456789", "org-b": "tenant-b-key-0123456789"}


@dataclass
class Two:
    stub: GenerationStub
    compute: FakeComputeBackend
    products: dict[str, str]
    channel: grpc.aio.Channel

    @staticmethod
    def auth(org: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {KEYS[org]}"),)

    async def create(self, org: str) -> pb.CreateGenerateGenerationResponse:
        request = generate_request(self.products[org])
        response: pb.CreateGenerateGenerationResponse = await self.stub.CreateGenerateGeneration(
            request, metadata=self.auth(org)
        )
        return response


async def _two(
    tmp_path: Path, *, server: ServerSettings | None = None, **orchestration: int
) -> AsyncIterator[Two]:
    keys = tuple(ApiKey(organization=org, key=key) for org, key in KEYS.items())
    settings = make_settings(tmp_path).model_copy(
        update={
            "auth": AuthSettings(api_keys=keys),
            "orchestration": OrchestrationSettings(progress_interval=0.0, **orchestration),
            **({"server": server} if server else {}),
        }
    )
    compute = FakeComputeBackend(hold=True)
    async with (
        App(settings, compute=compute) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        catalog = CatalogStub(channel)
        products = {}
        for org in KEYS:
            products[org] = await create_product(catalog, f"{org} dress", metadata=Two.auth(org))
        yield Two(GenerationStub(channel), compute, products, channel)


@pytest.fixture
async def capped(tmp_path: Path) -> AsyncIterator[Two]:
    # One compute slot, so two workflows run and the rest wait for a turn.
    async for two in _two(tmp_path, max_tasks_in_flight=1):
        yield two


async def test_a_flooding_tenant_does_not_starve_another(capped: Two) -> None:
    flood = [await capped.create("org-a") for _ in range(10)]
    await wait_submitted(capped.compute, 1)
    single = await capped.create("org-b")
    # A's eight waiting generations would all go first in one line; in turns, B is second.
    assert single.generation.queue_position == 2
    assert [f.generation.queue_position for f in flood] == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    last = await capped.stub.GetGeneration(
        pb.GetGenerationRequest(generation_id=flood[-1].generation.id),
        metadata=capped.auth("org-a"),
    )
    assert last.generation.queue_position == 9  # now one turn of B's comes before it
    b_key = single.generation.predictions[0].tasks[0].id
    for finished in range(1, 6):
        compute_id = next(
            cid for cid, task in capped.compute.tasks.items() if not task.snapshot().outputs
        )
        capped.compute.complete(compute_id)
        await wait_submitted(capped.compute, finished + 1)
        keys = [request.idempotency_key for request in capped.compute.submitted]
        if b_key in keys:
            break
    # Two of A's were running when B arrived; A had one more turn, then B's: its task was
    # the fourth to reach compute, where a single line would have made it the eleventh.
    assert keys.index(b_key) <= 3
    got = await capped.stub.GetGeneration(
        pb.GetGenerationRequest(generation_id=single.generation.id),
        metadata=capped.auth("org-b"),
    )
    assert got.generation.queue_position == 0
    # And every one of A's still runs to the end once compute is free.
    capped.compute.hold = False
    for compute_id in list(capped.compute.tasks):
        capped.compute.complete(compute_id)
    for created in flood:
        done = await wait_terminal(
            capped.stub, created.generation.id, metadata=capped.auth("org-a")
        )
        assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED


async def test_an_organization_at_its_live_limit_is_told_to_wait(tmp_path: Path) -> None:
    async for two in _two(tmp_path, max_live_per_organization=2):
        await two.create("org-a")
        await two.create("org-a")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await two.create("org-a")
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "ORGANIZATION_LIMIT"
        await two.create("org-b")  # the other tenant is not held back
        two.compute.hold = False
        for compute_id in list(two.compute.tasks):
            two.compute.complete(compute_id)
        await wait_terminal(
            two.stub, (await two.create("org-b")).generation.id, metadata=two.auth("org-b")
        )


def _retry_delay(error: grpc.aio.AioRpcError) -> float:
    retry = error_details_pb2.RetryInfo()
    (packed,) = [d for d in rich_status(error).details if d.Is(retry.DESCRIPTOR)]
    packed.Unpack(retry)
    return float(retry.retry_delay.ToTimedelta().total_seconds())


async def _upload(two: Two, org: str) -> str:
    """An image of ``org``'s, as ``artifact:<sha256>``."""

    async def parts() -> AsyncIterator[art.UploadArtifactRequest]:
        yield art.UploadArtifactRequest(header=art.UploadArtifactHeader())
        yield art.UploadArtifactRequest(chunk=png_bytes((40, 90, 160)))

    stub = artifact_service_pb2_grpc.ArtifactServiceStub(two.channel)
    uploaded = await stub.UploadArtifact(parts(), metadata=two.auth(org))
    return f"artifact:{uploaded.artifact.sha256}"


async def _burst(two: Two, orgs: list[str]) -> tuple[list[str], list[grpc.aio.AioRpcError]]:
    """Fire one create per entry of ``orgs`` at once: the ids admitted, the refusals.

    Each adjusts an upload, so each create reads the store before its commit (checking
    that the organization owns the image): the creates overlap on their way to it.
    """
    images = {org: await _upload(two, org) for org in set(orgs)}
    answers = await asyncio.gather(
        *(
            two.stub.CreateImageAdjustingGeneration(
                pb.CreateImageAdjustingGenerationRequest(
                    params=resources_pb2.ImageAdjustingParams(
                        base_image_url=images[org], brightness=0.2
                    )
                ),
                metadata=two.auth(org),
            )
            for org in orgs
        ),
        return_exceptions=True,
    )
    admitted = [
        a.generation.id for a in answers if isinstance(a, pb.CreateImageAdjustingGenerationResponse)
    ]
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(admitted) + len(refused) == len(orgs)  # nothing else (no INTERNAL)
    return admitted, refused


async def test_the_live_cap_holds_under_concurrent_creates(tmp_path: Path) -> None:
    async for two in _two(tmp_path, max_live_per_organization=10):
        admitted, refused = await _burst(two, ["org-a"] * 50)
        assert len(admitted) == 10
        assert len(refused) == 40
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(error).reason == "ORGANIZATION_LIMIT"
            assert _retry_delay(error) > 0
        listed = await two.stub.ListGenerations(
            pb.ListGenerationsRequest(page_size=100), metadata=two.auth("org-a")
        )
        assert sorted(g.id for g in listed.generations) == sorted(admitted)
        # A refused create took nothing: finishing one frees exactly one place.
        await wait_submitted(two.compute, 1)
        two.compute.complete(next(iter(two.compute.tasks)))

        async def one_done(two: Two = two) -> bool:
            listed = await two.stub.ListGenerations(
                pb.ListGenerationsRequest(page_size=100), metadata=two.auth("org-a")
            )
            return sum(g.done for g in listed.generations) == 1

        await assert_eventually(one_done)
        again, still = await _burst(two, ["org-a"] * 5)
        assert (len(again), len(still)) == (1, 4)


async def test_retries_of_one_request_take_one_place(tmp_path: Path) -> None:
    async for two in _two(tmp_path, max_live_per_organization=10):
        requests = []
        for n in range(10):
            request = generate_request(two.products["org-a"])
            request.request_id = f"request-{n}"
            requests += [request] * 5  # each sent five times at once
        answers = await asyncio.gather(
            *(two.stub.CreateGenerateGeneration(r, metadata=two.auth("org-a")) for r in requests)
        )
        by_request: dict[str, set[str]] = {}
        for request, answer in zip(requests, answers, strict=True):
            by_request.setdefault(request.request_id, set()).add(answer.generation.id)
        assert all(len(ids) == 1 for ids in by_request.values())
        assert len({i for ids in by_request.values() for i in ids}) == 10
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await two.create("org-a")  # the eleventh request: the cap is reached
        assert error_info(caught.value).reason == "ORGANIZATION_LIMIT"


async def test_the_queue_bound_holds_under_concurrent_creates(tmp_path: Path) -> None:
    async for two in _two(tmp_path, max_queued_generations=10):
        admitted, refused = await _burst(two, ["org-a", "org-b"] * 25)
        assert len(admitted) == 10
        assert len(refused) == 40
        for error in refused:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _retry_delay(error) > 0


async def test_each_organization_has_its_own_call_rate(tmp_path: Path) -> None:
    server = ServerSettings(port=0, grace_period=1.0, rate_limit=0.5, rate_burst=3)
    async for two in _two(tmp_path, server=server):
        # The product each tenant made in setup took one token of its three.
        for _ in range(2):
            await two.stub.ListGenerations(pb.ListGenerationsRequest(), metadata=two.auth("org-a"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await two.stub.ListGenerations(pb.ListGenerationsRequest(), metadata=two.auth("org-a"))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "RATE_LIMITED"
        retry = error_details_pb2.RetryInfo()
        (packed,) = [d for d in rich_status(caught.value).details if d.Is(retry.DESCRIPTOR)]
        packed.Unpack(retry)
        assert 1.0 <= retry.retry_delay.ToTimedelta().total_seconds() <= 2.0
        await two.stub.ListGenerations(pb.ListGenerationsRequest(), metadata=two.auth("org-b"))


async def test_token_buckets_refill_at_their_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(2.0, 2, clock=lambda: now[0])
    assert await buckets.take("a") == 0.0
    assert await buckets.take("a") == 0.0
    assert await buckets.take("a") == pytest.approx(0.5)
    assert await buckets.take("b") == 0.0
    now[0] = 0.5
    assert await buckets.take("a") == 0.0
    assert await buckets.take("a") == pytest.approx(0.5)
