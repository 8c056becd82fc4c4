"""No credential reaches a log line, not even one a library writes.

A real server process (``python -m server``, logging as in production, at DEBUG, with
gRPC core's tracers asked for) is sent every API key and token the auth tests use,
valid and mangled: lower-case scheme, extra spaces, another scheme, no scheme,
truncated, and followed by a non-ASCII character or a byte that is not UTF-8 (grpc's
own client refuses those, so they go over a bare HTTP/2 connection). Then everything it
wrote to stdout and stderr is searched for each secret and for pieces of it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest
from conftest import make_settings
from helpers import GenerationStub
from procs import ServerProcess
from rawh2 import grpc_status
from tokens import AUDIENCE, ISSUER, Keys

from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ApiKey, AuthSettings

METHOD = "/sartiq.generation.v1.GenerationService/ListGenerations"
# The API keys of tests/api/test_auth.py, and the wrong one it sends.
API_KEYS = {
    "a-key-for-org-one-0123": "org-one",
    "reader-key-0123456789": "org-one",
    "writer-key-0123456789": "org-one",
    "admin-key-01234567890": "org-one",
    "file-key-0123456789": "org-two",
}
WRONG_KEYS = ("wrong-key-wrong-key",)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]
ANSWERS = (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED)  # valid, or refused


def _secrets(keys: Keys) -> list[str]:
    tokens = [keys.valid(), keys.valid(scope="read"), keys.valid(org="org-other")]
    hostile = [t for t in keys.hostile().values() if len(t) > 20]  # "..": nothing to find
    return [*API_KEYS, *WRONG_KEYS, *tokens, *hostile]


def _ascii_variants(secret: str) -> list[str]:
    """How a caller may send ``secret`` in ``authorization``, right or wrong."""
    return [
        f"Bearer {secret}",
        f"bearer {secret}",
        f"Bearer    {secret}   ",
        f"Basic {secret}",
        f"Token {secret}",
        secret,
        f"Bearer {secret[:-3]}",
    ]


def _raw_variants(secret: str) -> list[bytes]:
    """``secret`` followed by what grpc's client will not send."""
    return [
        f"Bearer {secret}é".encode(),  # valid UTF-8, not ASCII
        f"Bearer {secret}".encode() + b"\xff",  # not UTF-8: grpc logs the value
        secret.encode() + b"\xff",
    ]


def _pieces(secret: str) -> list[str]:
    """``secret`` and pieces of it a log line might show instead of the whole."""
    if secret.count(".") == 2:  # a JWT: each signed segment on its own
        return [secret, *(part for part in secret.split(".") if len(part) >= 12)]
    return [secret, secret[:12], secret[-12:]]


async def _code(stub: GenerationStub, authorization: str) -> grpc.StatusCode:
    try:
        await stub.ListGenerations(
            pb.ListGenerationsRequest(), metadata=(("authorization", authorization),)
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture
def keys() -> Keys:
    return Keys()


async def test_no_key_or_token_reaches_any_log_line(tmp_path: Path, keys: Keys) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(keys.jwks())
    api_keys = [{"organization": org, "key": key} for key, org in API_KEYS.items()]
    server = ServerProcess.service(
        tmp_path,
        AUTH__API_KEYS=json.dumps(api_keys),
        AUTH__JWT_KEYS_FILE=str(jwks),
        AUTH__JWT_ISSUER=ISSUER,
        AUTH__JWT_AUDIENCE=AUDIENCE,
        LOG_LEVEL="DEBUG",
    )
    # What an operator might set to debug gRPC: its tracers print every call's metadata.
    server.env.update(GRPC_TRACE="api,http,chttp2_hpack_parser", GRPC_VERBOSITY="DEBUG")
    await server.start()
    secrets = _secrets(keys)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = GenerationStub(channel)
            for secret in secrets:
                for value in _ascii_variants(secret):
                    assert await _code(stub, value) in ANSWERS, value
        for secret in secrets:
            for raw in _raw_variants(secret):
                status = await grpc_status(server.port, METHOD, [(b"authorization", raw)])
                assert status == UNAUTHENTICATED, raw
    finally:
        await server.stop()
    log = server.log_path.read_text(errors="replace")
    for secret in secrets:
        for piece in _pieces(secret):
            assert piece not in log, f"{piece!r} of {secret[:6]}... is in the server's log"
    assert '"logger": "sartiq.access"' in log  # the calls were logged, without secrets
    assert "Invalid encoding on b'[REDACTED]'" in log  # grpc's line is still there
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert [line for line in lines if line["level"] in ("ERROR", "CRITICAL")] == []


async def test_grpc_records_are_clean_for_every_handler_of_an_embedded_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No logging.configure here, as when the app is embedded: pytest's own handler (not
    # ours, no filter) still receives grpc's record of the undecodable value clean,
    # because the app puts the filter on grpc's loggers themselves.
    caplog.set_level(logging.DEBUG)
    key = "a-key-for-org-one-0123"
    auth = AuthSettings(api_keys=(ApiKey(organization="org-one", key=key),))
    settings = make_settings(tmp_path).model_copy(update={"auth": auth})
    async with App(settings, compute=FakeComputeBackend()) as app:
        for raw in _raw_variants(key):
            status = await grpc_status(app.port, METHOD, [(b"authorization", raw)])
            assert status == UNAUTHENTICATED, raw
    for record in caplog.records:
        shown = record.getMessage() + (record.exc_text or "")
        assert key[:12] not in shown, shown
        assert key[-12:] not in shown, shown
    undecodable = [r for r in caplog.records if r.getMessage().startswith("Invalid encoding")]
    assert undecodable, "grpc no longer logs undecodable metadata: drop this test's premise"
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in undecodable)
