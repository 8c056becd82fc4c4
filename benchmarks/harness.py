"""Measure the service against a bare grpc.aio echo server on this machine (DESIGN §10).

Each server runs in its own process; the load comes from this one. Every figure is
reported raw and as a ratio to the echo baseline measured in the same run.

    python -m benchmarks.harness [--seconds 5] [--concurrency 1,10,100] [--soak 100000]

Back-pressure (RESOURCE_EXHAUSTED) is counted as "refused" and retried after the delay
its RetryInfo gives. The tx/stm/drv/wr columns are the server's store work per
generation: transactions, SQL statements, database driver calls, and queued writes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from benchmarks.common import png, server_process
from sartiq_grpc import errors
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
    refused: int = 0  # RESOURCE_EXHAUSTED answers (each retried after its RetryInfo delay)
    store: dict[str, float] | None = None  # the server's writer stats over the run

    @property
    def rate(self) -> float:
        """Completed calls per second."""
        return self.calls / self.seconds


def _retry_after(error: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay of a RESOURCE_EXHAUSTED answer, 0.1 s when it gives none."""
    refused = errors.from_rpc_error(error)
    if isinstance(refused, errors.ResourceExhaustedError) and refused.retry_after:
        return refused.retry_after
    return 0.1


async def load(
    name: str,
    call: Call,
    concurrency: int,
    seconds: float,
    *,
    warm_up: float = 0.0,
    on_window: Callable[[], Awaitable[None]] | None = None,
) -> Result:
    """Run ``call`` from ``concurrency`` callers for ``seconds``; rate and latency.

    With ``warm_up`` the callers run that much longer first, and only the calls started
    after it count: the window sees the load's steady state, not the burst of every caller
    starting at once. ``on_window`` is awaited when the window opens (e.g. to take
    counters), while the callers go on.
    """
    latencies: list[float] = []
    refused = 0
    started = time.perf_counter()
    window = started + warm_up
    deadline = window + seconds

    async def worker() -> None:
        nonlocal refused
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                await call()
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                # Back-pressure is an answer, not a crash: count it, wait as told.
                refused += start >= window
                await asyncio.sleep(_retry_after(error))
                continue
            if start >= window:
                latencies.append(time.perf_counter() - start)

    async def open_window() -> None:
        await asyncio.sleep(warm_up)
        if on_window is not None:
            await on_window()

    await asyncio.gather(open_window(), *(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - window
    ordered = sorted(latencies) or [float("nan")]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return Result(
        name,
        concurrency,
        len(latencies),
        elapsed,
        statistics.median(ordered) * 1e3,
        p99 * 1e3,
        refused,
    )


async def _echo(concurrency: list[int], seconds: float) -> list[Result]:
    async with server_process("echo") as echo, grpc.aio.insecure_channel(echo.target) as channel:
        unary = channel.unary_unary("/bench.Echo/Unary", None, None)
        payload = b"x" * 64
        return [await load("echo unary", lambda: unary(payload), n, seconds) for n in concurrency]


async def _sartiq(figure: str, concurrency: int, seconds: float) -> Result:
    """One figure at one load level, on a fresh server so no backlog carries over.

    Creates run against a compute backend that holds every task (the figure is the
    service's own cost of accepting work); end to end against one that completes at once.
    """
    hold = figure == "create"
    with tempfile.TemporaryDirectory() as tmp:
        server_args = ("sartiq", tmp, "hold" if hold else "instant")
        async with server_process(*server_args) as server:
            async with SartiqClient(server.target) as client:
                product = await client.create_entity("product", "bench", images=[png()])
                request = generation_service_pb2.CreateGenerateGenerationRequest(
                    params=resources_pb2.GenerateParams(
                        product_id=product.id, shot_type_string="front", width=64, height=64
                    )
                )

                async def create() -> object:
                    return await client.generations.CreateGenerateGeneration(request)

                async def end_to_end() -> object:
                    created = await client.generations.CreateGenerateGeneration(request)
                    async for _ in client.watch(created.generation.id):
                        pass
                    return created

                call = create if figure == "create" else end_to_end
                result = await load(figure, call, concurrency, seconds)
            stats = await server.stop()
    return dataclasses.replace(result, store=stats)


def _per_generation(result: Result) -> str:
    """Transactions, statements and driver calls per generation the run made."""
    if not result.store or not result.calls:
        return ""
    made = result.calls + 1  # and the catalog entity
    return (
        f"{result.store['transactions'] / made:>5.2f} {result.store['statements'] / made:>6.2f} "
        f"{result.store['driver_calls'] / made:>6.2f} {result.store['writes'] / made:>6.2f}"
    )


def _report(results: list[Result], echo: dict[int, Result]) -> None:
    print(
        f"{'figure':<12} {'callers':>7} {'calls':>7} {'per s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'vs echo':>8} {'refused':>7} {'tx/gen':>6} {'stm/gen':>6} {'drv/gen':>6} {'wr/gen':>6}"
    )
    for r in results:
        ratio = r.rate / echo[r.concurrency].rate
        print(
            f"{r.name:<12} {r.concurrency:>7} {r.calls:>7} {r.rate:>9.1f} "
            f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {ratio:>8.1%} {r.refused:>7} {_per_generation(r)}"
        )


async def _soak(count: int, concurrency: int) -> None:
    """Create and complete ``count`` generations on one server; its memory before and after."""
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            server_process("sartiq", tmp, "instant") as server,
            SartiqClient(server.target) as client,
        ):
            product = await client.create_entity("product", "bench", images=[png()])
            request = generation_service_pb2.CreateGenerateGenerationRequest(
                params=resources_pb2.GenerateParams(
                    product_id=product.id, shot_type_string="front", width=64, height=64
                )
            )
            remaining, completed = count, 0
            step = max(count // 10, 1)
            warm = step  # recent logs and SQLite page caches fill up during the first tenth
            marks: list[tuple[int, int]] = []

            async def worker() -> None:
                nonlocal remaining, completed
                while remaining > 0:
                    remaining -= 1
                    created = await client.generations.CreateGenerateGeneration(request)
                    async for _ in client.watch(created.generation.id):
                        pass
                    completed += 1
                    if completed == warm or completed % step == 0:
                        marks.append((completed, server.rss_kib()))

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
    marks.sort()
    print(
        f"soak: {count} generations end to end in {elapsed:.0f} s ({count / elapsed:.0f}/s); "
        "resident MiB after " + ", ".join(f"{n}: {kib / 1024:.0f}" for n, kib in marks)
    )
    after_warm_up = [kib for n, kib in marks if n >= warm]
    growth = (after_warm_up[-1] - after_warm_up[0]) / 1024
    print(f"soak: growth after the first {warm} generations (the warm-up): {growth:+.1f} MiB")


def main() -> None:
    """Run every measurement and print one table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,10,100")
    parser.add_argument("--soak", type=int, default=100_000, help="generations; 0 to skip")
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
        if args.soak:
            await _soak(args.soak, 100)

    asyncio.run(run())


if __name__ == "__main__":
    main()
