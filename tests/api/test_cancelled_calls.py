"""Calls a client abandons never take the server down (a server process, cancelled 200 times).

The server runs in its own process so a crash is seen as an exit status, not as the end
of the test run. Heartbeats every few milliseconds keep each watch stream busy sending,
so a cancel lands while the server is between messages, the case that used to segfault.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import CatalogStub, GenerationStub, create_generation, create_product
from procs import ServerProcess

from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2

ROUNDS = 200


async def _cancel_watch(target: str, generation_id: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        call = GenerationStub(channel).WatchGeneration(
            generation_service_pb2.WatchGenerationRequest(generation_id=generation_id)
        )
        await call.read()
        await call.read()
    # Leaving the block closed the channel, cancelling the stream mid-way.


async def _cancel_unary(stub: GenerationStub, generation_id: str) -> None:
    call = stub.GetGeneration(
        generation_service_pb2.GetGenerationRequest(generation_id=generation_id)
    )
    await asyncio.sleep(0)  # let the call reach the wire before it is cancelled
    call.cancel()


async def _cancel_health_watch(channel: grpc.aio.Channel) -> None:
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    await call.read()
    call.cancel()


async def test_abandoned_calls_leave_the_server_up(tmp_path: Path) -> None:
    server = ServerProcess.with_fake_compute(
        tmp_path, hold=True, SERVER__HEARTBEAT_INTERVAL="0.002"
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = GenerationStub(channel)
            product_id = await create_product(CatalogStub(channel))
            generation_id = await create_generation(stub, product_id, batch=4)
            for _ in range(ROUNDS):
                try:
                    await _cancel_watch(server.target, generation_id)
                    await _cancel_unary(stub, generation_id)
                    await _cancel_health_watch(channel)
                except grpc.aio.AioRpcError as exc:
                    await asyncio.wait_for(server.wait_exit(), 5)
                    raise AssertionError(
                        f"server exited with {server.returncode}:\n{server.log_tail()}"
                    ) from exc
                assert server.returncode is None, server.log_tail()
            # Still serving, and still tracking the live generation.
            response = await stub.GetGeneration(
                generation_service_pb2.GetGenerationRequest(generation_id=generation_id)
            )
            assert response.generation.id == generation_id
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest()
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        status = await server.stop()
    assert status == 0, server.log_tail()
