"""Measure the service against a bare grpc.aio echo server on this machine (DESIGN §10).

Each server runs in its own process; the load comes from this one. Every figure is
reported raw and as a ratio to the echo baseline measured in the same run.

    python -m benchmarks.harness [--seconds 5] [--concurrency 1,10,100]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from benchmarks.common import png, server_process
from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2, resources_pb2

Call = Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class Result:
    """Throughput and latency of one measurement."""

    name: str
    concurrency: int
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        """Completed calls per second."""
        return self.calls / self.seconds


async def _load(name: str, call: Call, concurrency: int, seconds: float) -> Result:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return Result(
        name, concurrency, len(ordered), elapsed, statistics.median(ordered) * 1e3, p99 * 1e3
    )


async def _echo(concurrency: list[int], seconds: float) -> list[Result]:
    async with server_process("echo") as echo, grpc.aio.insecure_channel(echo.target) as channel:
        unary = channel.unary_unary("/bench.Echo/Unary", None, None)
        payload = b"x" * 64
        return [await _load("echo unary", lambda: unary(payload), n, seconds) for n in concurrency]


async def _sartiq(figure: str, concurrency: int, seconds: float) -> Result:
    """One figure at one load level, on a fresh server so no backlog carries over."""
    with tempfile.TemporaryDirectory() as tmp:
        async with server_process("sartiq", tmp) as server, SartiqClient(server.target) as client:
            product = await client.create_entity("product", "bench", images=[png()])
            request = generation_service_pb2.CreateGenerateGenerationRequest(
                params=resources_pb2.GenerateParams(
                    product_id=product.id, shot_type_string="front", width=64, height=64
                )
            )

            async def create() -> object:
                return await client.generations.CreateGenerateGeneration(request)

            async def end_to_end() -> object:
                generation = (await client.generations.CreateGenerateGeneration(request)).generation
                async for _ in client.watch(generation.id):
                    pass
                return generation

            call = create if figure == "create" else end_to_end
            return await _load(figure, call, concurrency, seconds)


def _report(results: list[Result], echo: dict[int, Result]) -> None:
    print(
        f"{'figure':<12} {'callers':>7} {'calls':>7} {'per s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'vs echo':>8}"
    )
    for r in results:
        ratio = r.rate / echo[r.concurrency].rate
        print(
            f"{r.name:<12} {r.concurrency:>7} {r.calls:>7} {r.rate:>9.1f} "
            f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {ratio:>8.1%}"
        )


def main() -> None:
    """Run every measurement and print one table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,10,100")
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]

    async def run() -> None:
        echo = await _echo(levels, args.seconds)
        ours = [
            await _sartiq(figure, n, args.seconds)
            for figure in ("create", "end to end")
            for n in levels
        ]
        _report(echo + ours, {r.concurrency: r for r in echo})

    asyncio.run(run())


if __name__ == "__main__":
    main()
