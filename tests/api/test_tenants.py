"""Tenant isolation: tenant B walks every RPC with tenant A's ids and sees nothing of A's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_settings
from helpers import CatalogStub, GenerationStub, generate_request, png_bytes, wait_terminal

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2 as cat
from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2 as art
from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2_grpc, resources_pb2
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ApiKey, AuthSettings, ServerSettings

KEY_A = "tenant-a-key-0123456789"
KEY_B = "tenant-b-key-0123456789"


@dataclass
class Tenants:
    target: str
    channel: grpc.aio.Channel
    a: tuple[tuple[str, str], ...]
    b: tuple[tuple[str, str], ...]
    upload_sha: str
    product_id: str
    subject_id: str
    style_id: str
    generation_id: str
    prediction_id: str
    output_sha: str


@pytest.fixture
async def tenants(tmp_path: Path) -> AsyncIterator[Tenants]:
    keys = (
        ApiKey(organization="org-a", key=KEY_A, scopes=("read", "write", "admin")),
        ApiKey(organization="org-b", key=KEY_B, scopes=("read", "write", "admin")),
    )
    settings = make_settings(tmp_path).model_copy(
        update={
            "auth": AuthSettings(api_keys=keys),
            "server": ServerSettings(port=0, grace_period=1.0, heartbeat_interval=0.2),
        }
    )
    async with App(settings, compute=FakeComputeBackend()) as app:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        a = (("authorization", f"Bearer {KEY_A}"),)
        async with SartiqClient(f"127.0.0.1:{app.port}", api_key=KEY_A) as client:
            upload = await client.upload(png_bytes((10, 200, 30)))
        catalog = CatalogStub(channel)
        images = [cat.ImageInput(artifact=f"artifact:{upload.sha256}")]
        product = await catalog.CreateProduct(
            cat.CreateProductRequest(name="A's dress", reference_images=images), metadata=a
        )
        subject = await catalog.CreateSubject(cat.CreateSubjectRequest(name="Ana"), metadata=a)
        style = await catalog.CreateStyle(cat.CreateStyleRequest(name="Noir"), metadata=a)
        stub = GenerationStub(channel)
        created = await stub.CreateGenerateGeneration(
            generate_request(product.product.id), metadata=a
        )
        done = await wait_terminal(stub, created.generation.id, metadata=a)
        yield Tenants(
            f"127.0.0.1:{app.port}",
            channel,
            a,
            (("authorization", f"Bearer {KEY_B}"),),
            upload.sha256,
            product.product.id,
            subject.subject.id,
            style.style.id,
            done.id,
            done.predictions[0].id,
            done.predictions[0].artifact.sha256,
        )
        await channel.close(None)


async def _not_found(call: Awaitable[Any]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()


async def test_tenant_b_sees_nothing_of_tenant_a_through_any_rpc(tenants: Tenants) -> None:
    t, b = tenants, tenants.b
    stub, catalog = GenerationStub(t.channel), CatalogStub(t.channel)
    artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(t.channel)
    walked: set[str] = set()

    # GenerationService
    gen = t.generation_id
    await _not_found(stub.GetGeneration(pb.GetGenerationRequest(generation_id=gen), metadata=b))
    await _not_found(
        stub.CancelGeneration(pb.CancelGenerationRequest(generation_id=gen), metadata=b)
    )
    watch = stub.WatchGeneration(pb.WatchGenerationRequest(generation_id=gen), metadata=b)
    await _not_found(watch.read())
    listed = await stub.ListGenerations(pb.ListGenerationsRequest(), metadata=b)
    assert list(listed.generations) == []
    many = stub.WatchGenerations(pb.WatchGenerationsRequest(after_cursor=0), metadata=b)
    first = await asyncio.wait_for(many.read(), 10)
    assert isinstance(first, pb.WatchGenerationsResponse)
    assert first.HasField("heartbeat")  # A's events are not in B's history
    many.cancel()
    capabilities = await stub.GetCapabilities(pb.GetCapabilitiesRequest(), metadata=b)
    assert capabilities.strategies
    walked |= {
        "GetGeneration",
        "CancelGeneration",
        "WatchGeneration",
        "ListGenerations",
        "WatchGenerations",
        "GetCapabilities",
    }
    # Creates that reference A's things: catalog ids, A's prediction, A's upload and output.
    await _not_found(stub.CreateGenerateGeneration(generate_request(t.product_id), metadata=b))
    request = generate_request(t.product_id)
    request.params.product_id, request.params.subject_id = "", t.subject_id
    await _not_found(stub.CreateGenerateGeneration(request, metadata=b))
    request.params.subject_id, request.params.product_id = "", t.product_id
    for ref in (f"prediction:{t.prediction_id}", f"artifact:{t.upload_sha}"):
        face = resources_pb2.FaceFixingParams(base_image_url=ref)
        await _not_found(
            stub.CreateFaceFixingGeneration(
                pb.CreateFaceFixingGenerationRequest(params=face), metadata=b
            )
        )
    creates: dict[str, tuple[str, Any]] = {
        "CreateEditingGeneration": (
            "EditingParams",
            {
                "base_img_path": f"artifact:{t.output_sha}",
                "tool": 1,
                "reference_images": [f"artifact:{t.upload_sha}"],
            },
        ),
        "CreateRefineGeneration": (
            "RefineParams",
            {"base_image_url": f"prediction:{t.prediction_id}", "upscale_enabled": True},
        ),
        "CreateVideoGeneration": ("VideoParams", {"base_image_url": f"artifact:{t.output_sha}"}),
        "CreateBackgroundFixingGeneration": (
            "BackgroundFixingParams",
            {"base_image_url": f"artifact:{t.upload_sha}"},
        ),
        "CreateImageAdjustingGeneration": (
            "ImageAdjustingParams",
            {"base_image_url": f"prediction:{t.prediction_id}", "brightness": 0.1},
        ),
    }
    for method, (params_name, values) in creates.items():
        params = getattr(resources_pb2, params_name)(**values)
        request_type = getattr(pb, f"{method}Request")
        await _not_found(getattr(stub, method)(request_type(params=params), metadata=b))
    walked |= {"CreateGenerateGeneration", "CreateFaceFixingGeneration", *creates}

    # CatalogService
    for kind, entity_id in (
        ("Subject", t.subject_id),
        ("Product", t.product_id),
        ("Style", t.style_id),
    ):
        field = f"{kind.lower()}_id"
        get = getattr(cat, f"Get{kind}Request")(**{field: entity_id})
        await _not_found(getattr(catalog, f"Get{kind}")(get, metadata=b))
        delete = getattr(cat, f"Delete{kind}Request")(**{field: entity_id})
        await _not_found(getattr(catalog, f"Delete{kind}")(delete, metadata=b))
        listed_entities = await getattr(catalog, f"List{kind}s")(
            getattr(cat, f"List{kind}sRequest")(), metadata=b
        )
        assert not list(getattr(listed_entities, f"{kind.lower()}s"))
        images = [cat.ImageInput(artifact=f"artifact:{t.upload_sha}")]
        create = getattr(cat, f"Create{kind}Request")(name="x", reference_images=images)
        await _not_found(getattr(catalog, f"Create{kind}")(create, metadata=b))
        walked |= {f"Get{kind}", f"Delete{kind}", f"List{kind}s", f"Create{kind}"}
    lora = cat.CreateSubjectRequest(name="x", lora=cat.Lora(uri=f"artifact:{t.upload_sha}"))
    await _not_found(catalog.CreateSubject(lora, metadata=b))

    # ArtifactService: A's upload and A's output, even by hash
    for sha in (t.upload_sha, t.output_sha):
        await _not_found(artifacts.GetArtifact(art.GetArtifactRequest(sha256=sha), metadata=b))
        download = artifacts.DownloadArtifact(art.DownloadArtifactRequest(sha256=sha), metadata=b)
        await _not_found(download.read())
    walked |= {"GetArtifact", "DownloadArtifact"}
    # An upload of the same bytes is B's own copy: it does not open A's records.
    async with SartiqClient(t.target, api_key=KEY_B) as client:
        mine = await client.upload(png_bytes((10, 200, 30)))
    assert mine.sha256 == t.upload_sha
    await _not_found(artifacts.GetArtifact(art.GetArtifactRequest(sha256=t.output_sha), metadata=b))
    walked.add("UploadArtifact")

    everything = {
        m.name
        for module in (pb, art, cat)
        for service in module.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    }
    assert walked == everything

    # And A still sees all of it.
    got = await stub.GetGeneration(pb.GetGenerationRequest(generation_id=gen), metadata=t.a)
    assert got.generation.id == gen
