"""How failures travel: the server's mapping to statuses, and the client's back to errors.

A small gRPC server carries methods wrapped with the servicers' own ``unary`` and
``streaming`` decorators, so each way a method can end is driven on purpose; the
client's errors are then checked against the real service.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_settings

from sartiq_grpc import errors as client_errors
from sartiq_grpc.client import SartiqClient
from server.api.errors import streaming, unary
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.domain import errors

Context = grpc.aio.ServicerContext[Any, Any]


class _Methods:
    """Each method ends the call one way; the request body picks nothing."""

    @unary
    async def aborts_itself(self, request: bytes, context: Context) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the method's own status")
        raise AssertionError("unreachable")

    @unary
    async def breaks(self, request: bytes, context: Context) -> bytes:
        raise ValueError("a bug, whose text must not reach the client")

    @unary
    async def is_full(self, request: bytes, context: Context) -> bytes:
        raise errors.ResourceExhaustedError("the queue is full", retry_after=1.5)

    @unary
    async def is_invalid(self, request: bytes, context: Context) -> bytes:
        raise errors.InvalidArgumentError(
            [
                errors.FieldViolation("params.width", "must be positive"),
                errors.FieldViolation("params.height", "must be positive"),
            ]
        )

    @streaming
    async def streams_then_aborts(self, request: bytes, context: Context) -> AsyncGenerator[bytes]:
        yield b"one"
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "the stream's own status")

    @streaming
    async def streams_then_breaks(self, request: bytes, context: Context) -> AsyncGenerator[bytes]:
        yield b"one"
        raise KeyError("a bug")


def _identity(data: bytes) -> bytes:
    return data


@pytest.fixture
async def target() -> AsyncIterator[str]:
    methods = _Methods()
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(methods, name), request_deserializer=_identity, response_serializer=_identity
        )
        for name in ("aborts_itself", "breaks", "is_full", "is_invalid")
    } | {
        name: grpc.unary_stream_rpc_method_handler(
            getattr(methods, name), request_deserializer=_identity, response_serializer=_identity
        )
        for name in ("streams_then_aborts", "streams_then_breaks")
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _unary(target: str, name: str) -> client_errors.ApiError:
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/t.T/{name}", _identity, _identity)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call(b"")
    return client_errors.from_rpc_error(raised.value)


async def _stream(target: str, name: str) -> tuple[list[bytes], client_errors.ApiError]:
    received: list[bytes] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_stream(f"/t.T/{name}", _identity, _identity)

        async def drain() -> None:
            async for item in call(b""):
                received.append(item)

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await drain()
    return received, client_errors.from_rpc_error(raised.value)


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_method_that_ends_its_own_call_keeps_its_status(
    target: str, caplog: pytest.LogCaptureFixture
) -> None:
    error = await _unary(target, "aborts_itself")
    assert isinstance(error, client_errors.PermissionDeniedError)
    assert error.message == "the method's own status"
    assert _errors_logged(caplog) == []  # not mistaken for a bug and aborted twice


async def test_a_stream_that_ends_its_own_call_keeps_its_status(
    target: str, caplog: pytest.LogCaptureFixture
) -> None:
    received, error = await _stream(target, "streams_then_aborts")
    assert received == [b"one"]
    assert isinstance(error, client_errors.PermissionDeniedError)
    assert error.message == "the stream's own status"
    assert _errors_logged(caplog) == []


async def test_an_unexpected_exception_is_internal_without_its_text(
    target: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, streamed = await _stream(target, "streams_then_breaks")
    for error in (await _unary(target, "breaks"), streamed):
        assert isinstance(error, client_errors.InternalError)
        assert error.reason == "INTERNAL"
        assert "bug" not in error.message
        assert "correlation id" in error.message
    assert len(_errors_logged(caplog)) == 2  # the detail is in the server's log instead


async def test_domain_errors_arrive_as_their_client_classes(target: str) -> None:
    full = await _unary(target, "is_full")
    assert isinstance(full, client_errors.ResourceExhaustedError)
    assert (full.reason, full.retry_after) == ("QUEUE_FULL", 1.5)
    invalid = await _unary(target, "is_invalid")
    assert isinstance(invalid, client_errors.InvalidArgumentError)
    assert invalid.violations == {
        "params.width": "must be positive",
        "params.height": "must be positive",
    }


async def test_the_client_raises_typed_errors_from_the_service(tmp_path: Path) -> None:
    async with (
        App(make_settings(tmp_path), compute=FakeComputeBackend()) as app,
        SartiqClient(f"127.0.0.1:{app.port}") as client,
    ):
        with pytest.raises(client_errors.NotFoundError) as missing:
            await client.get("no-such-generation")
        assert missing.value.ids == {"generation_id": "no-such-generation"}
        assert missing.value.code is grpc.StatusCode.NOT_FOUND
        with pytest.raises(client_errors.InvalidArgumentError) as invalid:
            await client.generate(product_id="", width=-1)
        assert {"params.product_id", "params.width"} <= set(invalid.value.violations)
