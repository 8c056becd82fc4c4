"""API keys: every call but health and reflection needs one; each key is one organization."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from conftest import make_settings
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import CatalogStub, GenerationStub, error_info, generate_request
from procs import run_process, server_env

from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2 as catalog_pb
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ApiKey, AuthSettings, ServerSettings

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


# -- every RPC, scopes, JWTs, the loopback rule -----------------------------------------


def _all_methods() -> list[tuple[str, bool, bool]]:
    from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2
    from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2, generation_service_pb2

    return [
        (f"/{service.full_name}/{m.name}", m.client_streaming, m.server_streaming)
        for module in (generation_service_pb2, artifact_service_pb2, catalog_service_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for m in service.methods
    ]


async def _code(
    channel: grpc.aio.Channel, path: str, client_streaming: bool, server_streaming: bool
) -> grpc.StatusCode:
    identity: dict[str, Any] = {
        "request_serializer": lambda b: b,
        "response_deserializer": lambda b: b,
    }
    try:
        if client_streaming:
            await channel.stream_unary(path, **identity)(iter([b""]), timeout=5)
        elif server_streaming:
            await channel.unary_stream(path, **identity)(b"", timeout=5).read()
        else:
            await channel.unary_unary(path, **identity)(b"", timeout=5)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_every_rpc_but_health_and_reflection_needs_a_token(
    channel: grpc.aio.Channel,
) -> None:
    methods = _all_methods()
    assert len(methods) == 28
    for path, client_streaming, server_streaming in methods:
        code = await _code(channel, path, client_streaming, server_streaming)
        assert code == grpc.StatusCode.UNAUTHENTICATED, path


async def test_scopes_split_read_write_and_admin(tmp_path: Path) -> None:
    keys = (
        ApiKey(organization="org-one", key="reader-key-0123456789", scopes=("read",)),
        ApiKey(organization="org-one", key="writer-key-0123456789"),
        ApiKey(organization="org-one", key="admin-key-01234567890", scopes=("read", "admin")),
    )
    settings = make_settings(tmp_path).model_copy(update={"auth": AuthSettings(api_keys=keys)})
    async with (
        App(settings, compute=FakeComputeBackend()) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan,
    ):
        catalog = CatalogStub(chan)

        def auth(key: str) -> tuple[tuple[str, str], ...]:
            return (("authorization", f"Bearer {key}"),)

        request = catalog_pb.CreateSubjectRequest(name="Ana")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await catalog.CreateSubject(request, metadata=auth("reader-key-0123456789"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert dict(error_info(caught.value).metadata) == {"scope": "write"}
        created = await catalog.CreateSubject(request, metadata=auth("writer-key-0123456789"))
        get = catalog_pb.GetSubjectRequest(subject_id=created.subject.id)
        await catalog.GetSubject(get, metadata=auth("reader-key-0123456789"))
        delete = catalog_pb.DeleteSubjectRequest(subject_id=created.subject.id)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await catalog.DeleteSubject(delete, metadata=auth("writer-key-0123456789"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert dict(error_info(caught.value).metadata) == {"scope": "admin"}
        await catalog.DeleteSubject(delete, metadata=auth("admin-key-01234567890"))


@pytest.fixture
def signing_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _jwks(key: ec.EllipticCurvePrivateKey, kid: str) -> str:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    return json.dumps({"keys": [{**jwk, "kid": kid, "alg": "ES256", "use": "sig"}]})


def _token(key: ec.EllipticCurvePrivateKey, kid: str = "k1", **claims: Any) -> str:
    body = {
        "iss": "https://id.example",
        "aud": "sartiq",
        "exp": int(time.time()) + 300,
        "org": "org-jwt",
        **claims,
    }
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm="ES256", headers={"kid": kid})


async def test_signed_jwts_act_for_their_org_claim_with_their_scopes(
    tmp_path: Path, signing_key: ec.EllipticCurvePrivateKey
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(_jwks(signing_key, "k1"))
    auth = AuthSettings(jwt_keys_file=jwks, jwt_issuer="https://id.example", jwt_audience="sartiq")
    settings = make_settings(tmp_path).model_copy(update={"auth": auth})
    async with (
        App(settings, compute=FakeComputeBackend()) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan,
    ):
        stub, catalog = GenerationStub(chan), CatalogStub(chan)

        def bearer(token: str) -> tuple[tuple[str, str], ...]:
            return (("authorization", f"Bearer {token}"),)

        created = await catalog.CreateProduct(
            catalog_pb.CreateProductRequest(name="Dress"), metadata=bearer(_token(signing_key))
        )
        other_org = bearer(_token(signing_key, org="org-other"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await catalog.GetProduct(
                catalog_pb.GetProductRequest(product_id=created.product.id), metadata=other_org
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        other = ec.generate_private_key(ec.SECP256R1())
        refused = {
            "expired": _token(signing_key, exp=int(time.time()) - 600),
            "invalid": _token(signing_key, aud="someone-else"),
            "no org": _token(signing_key, org=None),
            "bad issuer": _token(signing_key, iss="https://evil.example"),
            "other key": _token(other),
            "unknown kid": _token(signing_key, kid="k9"),
            "garbage": "a.b.c",
        }
        for name, token in refused.items():
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListGenerations(pb.ListGenerationsRequest(), metadata=bearer(token))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            cause = "expired" if name == "expired" else "invalid"
            assert dict(error_info(caught.value).metadata) == {"cause": cause}, name
        reader = bearer(_token(signing_key, scope="read"))
        await stub.ListGenerations(pb.ListGenerationsRequest(), metadata=reader)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await catalog.CreateProduct(catalog_pb.CreateProductRequest(name="x"), metadata=reader)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_development_mode_only_on_loopback_unless_allowed(tmp_path: Path) -> None:
    env = server_env(tmp_path, SERVER__HOST="0.0.0.0")
    child = await run_process([sys.executable, "-m", "server"], env=env)
    assert child.returncode == 2
    assert "refusing to serve on 0.0.0.0 without authentication" in child.stderr
    server = ServerSettings(host="0.0.0.0", port=0, grace_period=1.0)
    allowed = make_settings(tmp_path).model_copy(
        update={"server": server, "auth": AuthSettings(allow_unauthenticated=True)}
    )
    async with (
        App(allowed, compute=FakeComputeBackend()) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan,
    ):
        await GenerationStub(chan).ListGenerations(pb.ListGenerationsRequest())
