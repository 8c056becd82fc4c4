"""Standard plumbing: health per service, reflection, request ids, graceful shutdown."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import make_settings
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import (
    CatalogStub,
    GenerationStub,
    assert_eventually,
    create_generation,
    create_product,
)

from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ServerSettings

SERVICES = ("sartiq.generation.v1.GenerationService", "sartiq.catalog.v1.CatalogService")


async def test_health_reports_each_service(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", *SERVICES):
        response = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names: set[str] = set()
    async for response in call:
        names = {s.name for s in response.list_services_response.service}
        break
    assert set(SERVICES) <= names
    assert "grpc.health.v1.Health" in names


async def test_request_id_is_echoed_and_generated(channel: grpc.aio.Channel) -> None:
    stub = GenerationStub(channel)
    call = stub.ListGenerations(
        generation_service_pb2.ListGenerationsRequest(), metadata=(("x-request-id", "abc-123"),)
    )
    await call
    # Unary answers carry it in the trailing metadata, errors included.
    assert ("x-request-id", "abc-123") in list(await call.trailing_metadata())
    call = stub.ListGenerations(generation_service_pb2.ListGenerationsRequest())
    await call
    generated = dict(await call.trailing_metadata())["x-request-id"]
    assert len(str(generated)) == 32
    failing = stub.GetGeneration(
        generation_service_pb2.GetGenerationRequest(generation_id="nope"),
        metadata=(("x-request-id", "err-7"),),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await failing
    trailers: Any = caught.value.trailing_metadata() or ()
    assert ("x-request-id", "err-7") in list(trailers)
    # Streams carry it in the initial metadata, before the first message.
    stream = stub.WatchGeneration(
        generation_service_pb2.WatchGenerationRequest(generation_id="nope"),
        metadata=(("x-request-id", "watch-1"),),
    )
    assert ("x-request-id", "watch-1") in list(await stream.initial_metadata())


async def test_shutdown_flips_health_to_not_serving(tmp_path: Path) -> None:
    app = App(make_settings(tmp_path), compute=FakeComputeBackend())
    await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICES[0]))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        await app.shutdown()
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await app.shutdown()  # idempotent


async def test_shutdown_ends_watch_streams_with_unavailable(tmp_path: Path) -> None:
    compute = FakeComputeBackend(hold=True)
    settings = make_settings(tmp_path).model_copy(
        update={"server": ServerSettings(port=0, grace_period=30.0)}
    )
    app = App(settings, compute=compute)
    await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        catalog = CatalogStub(channel)
        stub = GenerationStub(channel)
        product_id = await create_product(catalog, "p", colour=(5, 5, 5))
        generation_id = await create_generation(stub, product_id)
        call = stub.WatchGeneration(
            generation_service_pb2.WatchGenerationRequest(generation_id=generation_id)
        )
        first = await call.read()
        assert isinstance(first, generation_service_pb2.WatchGenerationResponse)
        assert first.event.sequence == 1
        await app.shutdown()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _drain(call)
        # Ended by the server's own shutdown path, not by the 30 s grace running out.
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "after_sequence=" in (caught.value.details() or "")


async def _drain(call: Any) -> None:
    while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
        pass


async def test_each_call_is_logged_with_its_outcome(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sartiq.access")
    stub = GenerationStub(channel)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetGeneration(
            generation_service_pb2.GetGenerationRequest(generation_id="missing"),
            metadata=(("x-request-id", "trace-1"),),
        )

    def logged() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "request_id", "") == "trace-1"]

    async def seen() -> bool:
        # The server logs as its handler exits, which may be just after the client
        # has the status.
        return bool(logged())

    await assert_eventually(seen)
    record = logged()[0]
    assert record.__dict__["rpc_method"].endswith("/GetGeneration")
    assert record.__dict__["code"] == "NOT_FOUND"
    assert record.__dict__["duration_ms"] >= 0
