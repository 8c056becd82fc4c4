"""Hostile JWTs: whatever a token's header or key says, the answer is UNAUTHENTICATED.

A token is checked only with the algorithms of the key its header names, and anything
a library raises while verifying one is still UNAUTHENTICATED with cause ``invalid``:
never INTERNAL, never a traceback in the log, never the token in a log line.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import jwt
import pytest
from conftest import make_settings
from cryptography.hazmat.primitives.asymmetric import rsa
from helpers import GenerationStub, error_info
from tokens import AUDIENCE, ISSUER, Keys, claims, forge, jwk, pem

from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import AuthSettings
from server.domain.errors import StartupError

EXPIRED = "expired"


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def _app(tmp_path: Path, key_file: Path) -> App:
    auth = AuthSettings(jwt_keys_file=key_file, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    settings = make_settings(tmp_path).model_copy(update={"auth": auth})
    return App(settings, compute=FakeComputeBackend())


@pytest.fixture
async def jwks_channel(tmp_path: Path, keys: Keys) -> AsyncIterator[grpc.aio.Channel]:
    key_file = tmp_path / "jwks.json"
    key_file.write_text(keys.jwks())
    async with (
        _app(tmp_path, key_file) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        yield channel


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _refusal(channel: grpc.aio.Channel, token: str) -> grpc.aio.AioRpcError:
    stub = GenerationStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListGenerations(pb.ListGenerationsRequest(), metadata=_bearer(token))
    return caught.value


def _mentions(records: list[logging.LogRecord], token: str) -> list[str]:
    """The log messages that show ``token`` or its signature."""
    signature = token.rpartition(".")[2]
    shown = [record.getMessage() for record in records]
    return [m for m in shown if token in m or (len(signature) > 8 and signature in m)]


def _loud(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if r.levelno >= logging.WARNING or r.exc_info]


async def test_tokens_of_the_wrong_kind_or_shape_are_unauthenticated_invalid(
    jwks_channel: grpc.aio.Channel, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    stub = GenerationStub(jwks_channel)
    # The forging itself makes valid tokens, for either key.
    await stub.ListGenerations(pb.ListGenerationsRequest(), metadata=_bearer(keys.valid()))
    rsa_token = forge({"alg": "RS256", "kid": "rsa-1"}, keys.rs256)
    await stub.ListGenerations(pb.ListGenerationsRequest(), metadata=_bearer(rsa_token))
    for name, token in keys.hostile().items():
        error = await _refusal(jwks_channel, token)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, name
        cause = EXPIRED if name == EXPIRED else "invalid"
        assert dict(error_info(error).metadata) == {"cause": cause}, name
        assert not _mentions(caplog.records, token), name
    # A wrong kind of key is a wrong algorithm, refused before PyJWT is handed the key:
    # nothing unexpected happened, so nothing is logged above INFO, and no traceback.
    assert _loud(caplog.records) == []


async def test_a_pem_key_takes_only_the_algorithms_of_its_kind(
    tmp_path: Path, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem(keys.ec.public_key()))
    async with (
        _app(tmp_path, key_file) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        token = forge({"alg": "ES256"}, keys.es256)
        await GenerationStub(channel).ListGenerations(
            pb.ListGenerationsRequest(), metadata=_bearer(token)
        )
        error = await _refusal(channel, forge({"alg": "RS256"}, keys.rs256))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(error_info(error).metadata) == {"cause": "invalid"}
    assert _loud(caplog.records) == []


async def test_any_exception_while_verifying_is_unauthenticated_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A 1024-bit RSA key makes PyJWT warn on every verification; with warnings turned into
    # errors (PYTHONWARNINGS=error, as in this suite) the warning is raised from
    # jwt.decode: an exception that is not a PyJWTError, as the TypeError of a key of the
    # wrong kind was.
    caplog.set_level(logging.INFO)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    key_file = tmp_path / "jwks.json"
    key_file.write_text(json.dumps({"keys": [jwk(weak.public_key(), "weak")]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        token = jwt.encode(claims(), weak, algorithm="RS256", headers={"kid": "weak"})
    async with (
        _app(tmp_path, key_file) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            error = await _refusal(channel, token)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(error_info(error).metadata) == {"cause": "invalid"}
    warned = [r for r in caplog.records if r.name == "server.api.auth"]
    assert [r.getMessage() for r in warned] == [
        "a bearer JWT could not be verified (InsecureKeyLengthWarning)"
    ]
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in warned)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert not _mentions(caplog.records, token)


async def test_a_key_file_without_a_usable_key_stops_the_start(tmp_path: Path, keys: Keys) -> None:
    only_rsa = tmp_path / "rsa.json"
    only_rsa.write_text(json.dumps({"keys": [jwk(keys.rsa.public_key(), "rsa-1")]}))
    not_a_key = tmp_path / "garbage.pem"
    not_a_key.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    cases = {
        only_rsa: "verifies any of the configured algorithms (ES256)",
        not_a_key: "cannot use the JWT keys",
    }
    for key_file, message in cases.items():
        auth = AuthSettings(jwt_keys_file=key_file, jwt_algorithms=("ES256",))
        settings = make_settings(tmp_path).model_copy(update={"auth": auth})
        with pytest.raises(StartupError, match=re.escape(message)):
            async with App(settings, compute=FakeComputeBackend()):
                pass
