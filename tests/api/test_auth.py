"""API keys: every call but health and reflection needs one; each key is one organization."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import make_settings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import GenerationStub, error_info, generate_request
from procs import run_process, server_env

from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ApiKey, AuthSettings

KEY = "a-key-for-org-one-0123"


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    keys = (ApiKey(organization="org-one", key=KEY),)
    settings = make_settings(tmp_path).model_copy(update={"auth": AuthSettings(api_keys=keys)})
    async with (
        App(settings, compute=FakeComputeBackend()) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan,
    ):
        yield chan


@pytest.mark.parametrize(
    "metadata",
    [(), (("authorization", "Bearer wrong-key-wrong-key"),), (("authorization", KEY),)],
    ids=["none", "unknown", "no-scheme"],
)
async def test_calls_without_a_valid_key_are_unauthenticated(
    channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...]
) -> None:
    stub = GenerationStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListGenerations(pb.ListGenerationsRequest(), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "UNAUTHENTICATED"
    call = stub.WatchGeneration(pb.WatchGenerationRequest(generation_id="x"), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_valid_key_acts_for_its_organization(channel: grpc.aio.Channel) -> None:
    stub = GenerationStub(channel)
    auth = (("authorization", f"Bearer {KEY}"),)
    listed = await stub.ListGenerations(pb.ListGenerationsRequest(), metadata=auth)
    assert list(listed.generations) == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateGenerateGeneration(generate_request("no-such-product"), metadata=auth)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # got past authentication


async def test_health_and_reflection_need_no_key(channel: grpc.aio.Channel) -> None:
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    async for response in call:
        assert response.list_services_response.service
        break


async def test_keys_file_is_read_and_a_bad_one_stops_the_start(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps([{"organization": "org-two", "key": "file-key-0123456789"}]))
    settings = make_settings(tmp_path).model_copy(update={"auth": AuthSettings(api_keys_file=keys)})
    async with (
        App(settings, compute=FakeComputeBackend()) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan,
    ):
        auth = (("authorization", "Bearer file-key-0123456789"),)
        await GenerationStub(chan).ListGenerations(pb.ListGenerationsRequest(), metadata=auth)
    keys.write_text("not json")
    env = server_env(tmp_path, AUTH__API_KEYS_FILE=str(keys))
    child = await run_process([sys.executable, "-m", "server"], env=env)
    assert child.returncode == 2
    assert "cannot read API keys" in child.stderr
    assert "file-key" not in child.stderr
