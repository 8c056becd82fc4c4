"""Hostile JWTs: whatever a token's header or key says, the answer is UNAUTHENTICATED.

A token is checked only with the algorithms of the key its header names, and anything
a library raises while verifying one is still UNAUTHENTICATED with cause ``invalid``:
never INTERNAL, never a traceback in the log, never the token in a log line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from conftest import make_settings
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from helpers import GenerationStub, error_info

from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import AuthSettings

ISSUER = "https://id.example"
AUDIENCE = "sartiq"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**extra: Any) -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": int(time.time()) + 300,
        "org": "org-jwt",
        **extra,
    }


def forge(header: Any, sign: Callable[[bytes], bytes], claims: dict[str, Any] | None = None) -> str:
    """A token with exactly ``header``, signed by ``sign`` over the signing input."""
    signing_input = (
        f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims or _claims()).encode())}"
    )
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _jwk(public_key: Any, kid: str) -> dict[str, Any]:
    if isinstance(public_key, rsa.RSAPublicKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public_key))
    else:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public_key))
    return {**jwk, "kid": kid, "use": "sig"}


class Keys:
    """The issuer's keys (EC P-256 "ec-1", RSA 2048 "rsa-1") and an attacker's."""

    def __init__(self) -> None:
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ed = ed25519.Ed25519PrivateKey.generate()

    def jwks(self) -> str:
        return json.dumps(
            {"keys": [_jwk(self.ec.public_key(), "ec-1"), _jwk(self.rsa.public_key(), "rsa-1")]}
        )

    def rs256(self, data: bytes) -> bytes:
        return self.rsa.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def es256(self, data: bytes) -> bytes:
        signature = self.ec.sign(data, ec.ECDSA(hashes.SHA256()))
        return jwt.utils.der_to_raw_signature(signature, self.ec.curve)

    def rsa_pem(self) -> bytes:
        return self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


async def _serve(tmp_path: Path, key_file: Path) -> App:
    auth = AuthSettings(jwt_keys_file=key_file, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    settings = make_settings(tmp_path).model_copy(update={"auth": auth})
    return App(settings, compute=FakeComputeBackend())


@pytest.fixture
async def jwks_channel(tmp_path: Path, keys: Keys) -> AsyncIterator[grpc.aio.Channel]:
    key_file = tmp_path / "jwks.json"
    key_file.write_text(keys.jwks())
    async with (
        await _serve(tmp_path, key_file) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        yield channel


async def _refusal(channel: grpc.aio.Channel, token: str) -> grpc.aio.AioRpcError:
    stub = GenerationStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListGenerations(
            pb.ListGenerationsRequest(), metadata=(("authorization", f"Bearer {token}"),)
        )
    return caught.value


def _mentions(records: list[logging.LogRecord], token: str) -> list[str]:
    """The log messages that show ``token`` or its signature."""
    signature = token.rpartition(".")[2]
    shown = [record.getMessage() for record in records]
    return [m for m in shown if token in m or (len(signature) > 8 and signature in m)]


def _hostile_tokens(keys: Keys) -> dict[str, str]:
    ed = keys.ed
    return {
        "RS256 on the EC key": forge({"alg": "RS256", "kid": "ec-1"}, keys.rs256),
        "ES256 on the RSA key": forge({"alg": "ES256", "kid": "rsa-1"}, keys.es256),
        "EdDSA on the RSA key": forge({"alg": "EdDSA", "kid": "rsa-1"}, ed.sign),
        "alg none": forge({"alg": "none", "kid": "ec-1"}, lambda _: b""),
        "HS256 keyed with the RSA public key": forge(
            {"alg": "HS256", "kid": "rsa-1"},
            lambda data: hmac.new(keys.rsa_pem(), data, hashlib.sha256).digest(),
        ),
        "no kid among several keys": forge({"alg": "ES256"}, keys.es256),
        "kid not a string": forge({"alg": "ES256", "kid": 7}, keys.es256),
        "alg a list": forge({"alg": ["ES256"], "kid": "ec-1"}, keys.es256),
        "header not an object": forge([1, 2], keys.es256),
        "unknown critical header": forge(
            {"alg": "ES256", "kid": "ec-1", "crit": ["x"]}, keys.es256
        ),
        "not base64": "@@@.@@@.@@@",
        "empty segments": "..",
    }


async def test_tokens_of_the_wrong_kind_or_shape_are_unauthenticated_invalid(
    jwks_channel: grpc.aio.Channel, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    good = forge({"alg": "ES256", "kid": "ec-1"}, keys.es256)
    await GenerationStub(jwks_channel).ListGenerations(
        pb.ListGenerationsRequest(), metadata=(("authorization", f"Bearer {good}"),)
    )  # the forging itself makes valid tokens
    for name, token in _hostile_tokens(keys).items():
        error = await _refusal(jwks_channel, token)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert dict(error_info(error).metadata) == {"cause": "invalid"}, name
        assert not _mentions(caplog.records, token), name
    # A wrong kind of key is a wrong algorithm, refused before PyJWT sees the key: nothing
    # unexpected happened, so nothing is logged above INFO, and never a traceback.
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == []


async def test_a_pem_key_takes_only_the_algorithms_of_its_kind(
    tmp_path: Path, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(
        keys.ec.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    async with (
        await _serve(tmp_path, key_file) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        await GenerationStub(channel).ListGenerations(
            pb.ListGenerationsRequest(),
            metadata=(("authorization", f"Bearer {forge({'alg': 'ES256'}, keys.es256)}"),),
        )
        error = await _refusal(channel, forge({"alg": "RS256"}, keys.rs256))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(error_info(error).metadata) == {"cause": "invalid"}
    assert [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info] == []


async def test_any_exception_while_verifying_is_unauthenticated_without_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A 1024-bit RSA key makes PyJWT warn on every verification; with warnings turned into
    # errors (PYTHONWARNINGS=error, as in this suite) the warning is raised from
    # jwt.decode: an exception that is not a PyJWTError, like the TypeError of a key of
    # the wrong kind used to be.
    caplog.set_level(logging.INFO)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    key_file = tmp_path / "jwks.json"
    key_file.write_text(json.dumps({"keys": [_jwk(weak.public_key(), "weak")]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        token = jwt.encode(_claims(), weak, algorithm="RS256", headers={"kid": "weak"})
    async with (
        await _serve(tmp_path, key_file) as app,
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
