"""Watch-stream and recovery figures of DESIGN §10, each on a fresh server process.

    python -m benchmarks.streams [--watchers 1,10,100,1000] [--recovery 1000]

* fan-out: N streams follow one held generation of 16 predictions; cancelling it makes
  the server publish its cancellation events at once, and every stream reads them to
  the end. Reported: deliveries per second (against a bare grpc.aio server streaming
  the same number of messages to N calls) and the server's memory per idle stream.
* latency: N ``WatchGenerations`` streams (filtered to PENDING, so one event per
  generation) while generations are created at a steady pace that leaves the fan-out
  headroom. Reported: commit-to-delivery latency, from the event's time (taken before
  its commit, so the figure includes the commit) to its receipt, on the same clock.
  The burst above is not a latency figure: its last events wait behind the first ones.
* recovery: N generations are left in flight by a server that stops; a new server on
  the same database resumes them with instant compute. Reported: time to serve and
  time until every one is COMPLETED.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from datetime import UTC
from typing import Any

import grpc

from benchmarks.common import png, server_process
from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2

PACED_EVENTS = 25
PACE = 0.2  # seconds between paced events: at 1,000 streams, about a third of capacity
_LIVE = [enums_pb2.GENERATION_STATUS_PENDING, enums_pb2.GENERATION_STATUS_PROCESSING]


async def _read_to_end(call: Any, since: float, latencies: list[float]) -> int:
    """Read a stream to its terminal event; count and time the events made after ``since``.

    Earlier events (the replay of what happened before the measurement) are read but
    neither counted nor timed.
    """
    count = 0
    while (item := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        if not item.HasField("event"):
            continue
        made = item.event.event_time.ToDatetime(tzinfo=UTC).timestamp()
        if made >= since:
            count += 1
            latencies.append(time.time() - made)
        if item.event.terminal:
            break
    return count


async def echo_streams(streams: int, messages: int = 34) -> float:
    """Messages per second a bare grpc.aio server streams to ``streams`` concurrent calls."""
    async with server_process("echo") as echo, grpc.aio.insecure_channel(echo.target) as channel:
        call = channel.unary_stream("/bench.Echo/Stream", None, None)
        payload = messages.to_bytes(4, "big") + b"x" * 200

        async def one() -> int:
            return sum([1 async for _ in call(payload)])

        started = time.perf_counter()
        total = sum(await asyncio.gather(*(one() for _ in range(streams))))
        return total / (time.perf_counter() - started)


async def _read_events(call: Any, count: int, latencies: list[float] | None) -> None:
    """Read ``count`` events from a stream, timing each one's delivery into ``latencies``."""
    seen = 0
    while seen < count:
        item = await call.read()
        if item is grpc.aio.EOF:  # type: ignore[attr-defined]
            raise RuntimeError("the stream ended early")
        if item.HasField("event"):
            seen += 1
            if latencies is not None:
                made = item.event.event_time.ToDatetime(tzinfo=UTC).timestamp()
                latencies.append(time.time() - made)


async def paced_latency(
    client: SartiqClient, product_id: str, watchers: int, events: int, pace: float
) -> list[float]:
    """Commit-to-delivery latencies of ``events`` events, one per ``pace`` seconds.

    The streams start at cursor 0, so none can miss an event however late it subscribes:
    each first replays the creation of the one generation made before (the burst's), and
    once every stream has it, all are live.
    """
    request = generation_service_pb2.WatchGenerationsRequest(
        filter=generation_service_pb2.GenerationFilter(
            statuses=[enums_pb2.GENERATION_STATUS_PENDING]
        ),
        after_cursor=0,
    )
    calls = [client.generations.WatchGenerations(request) for _ in range(watchers)]
    await asyncio.gather(*(_read_events(call, 1, None) for call in calls))
    latencies: list[float] = []
    readers = [asyncio.create_task(_read_events(call, events, latencies)) for call in calls]
    for _ in range(events):
        await client.generate(product_id=product_id, shot_type_string="front", width=64, height=64)
        await asyncio.sleep(pace)  # the load's pace, not a wait for a condition
    await asyncio.gather(*readers)
    for call in calls:
        call.cancel()
    return latencies


async def echo_latency(streams: int, events: int, pace: float) -> list[float]:
    """The same paced measurement against a bare grpc.aio server broadcasting to queues."""
    async with server_process("echo") as echo, grpc.aio.insecure_channel(echo.target) as channel:
        subscribe = channel.unary_stream("/bench.Echo/Subscribe", None, None)
        publish = channel.unary_unary("/bench.Echo/Publish", None, None)
        calls = [subscribe(b"") for _ in range(streams)]
        while int.from_bytes(await publish(b"warm-up"), "big") < streams:
            pass  # each publish also tells how many streams have subscribed so far
        latencies: list[float] = []

        async def read(call: Any) -> None:
            seen = 0
            while seen < events:
                message = await call.read()
                if message == b"warm-up":
                    continue
                seen += 1
                latencies.append(time.time() - float(message.decode()))

        readers = [asyncio.create_task(read(call)) for call in calls]
        for _ in range(events):
            await publish(repr(time.time()).encode())
            await asyncio.sleep(pace)  # the load's pace, not a wait for a condition
        await asyncio.gather(*readers)
        await publish(b"end")
        for call in calls:
            if await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                raise RuntimeError("a broadcast stream did not end")
    return latencies


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


async def fan_out(watchers: int) -> dict[str, float]:
    """Deliveries per second to ``watchers`` streams, memory per idle stream, latency."""
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            server_process("sartiq", tmp, "hold") as server,
            SartiqClient(server.target) as client,
        ):
            product = await client.create_entity("product", "bench", images=[png()])
            generation = await client.generate(
                product_id=product.id, shot_type_string="front", batch_size=16, width=64, height=64
            )
            request = generation_service_pb2.WatchGenerationRequest(generation_id=generation.id)
            before = server.rss_kib()
            calls = [client.generations.WatchGeneration(request) for _ in range(watchers)]
            await asyncio.gather(*(call.read() for call in calls))
            idle_kib = server.rss_kib() - before
            latencies: list[float] = []
            since = time.time()
            started = time.perf_counter()
            readers = [asyncio.create_task(_read_to_end(call, since, latencies)) for call in calls]
            await client.cancel(generation.id)
            counts = await asyncio.gather(*readers)
            elapsed = time.perf_counter() - started
            paced = await paced_latency(client, product.id, watchers, PACED_EVENTS, PACE)
    return {
        "watchers": watchers,
        "deliveries": sum(counts),
        "per_s": sum(counts) / elapsed,
        "burst_p99_ms": _percentile(latencies, 0.99) * 1e3,
        "p50_ms": statistics.median(paced) * 1e3,
        "p99_ms": _percentile(paced, 0.99) * 1e3,
        "bytes_per_idle_stream": idle_kib * 1024 / watchers,
    }


async def recovery(count: int) -> dict[str, float]:
    """Seconds for a restarted server to serve and to complete ``count`` resumed generations."""
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            server_process("sartiq", tmp, "hold") as server,
            SartiqClient(server.target) as client,
        ):
            product = await client.create_entity("product", "bench", images=[png()])
            semaphore = asyncio.Semaphore(32)

            async def create() -> None:
                async with semaphore:
                    await client.generate(
                        product_id=product.id, shot_type_string="front", width=64, height=64
                    )

            await asyncio.gather(*(create() for _ in range(count)))
        started = time.perf_counter()
        async with server_process("sartiq", tmp) as server, SartiqClient(server.target) as client:
            serving = time.perf_counter() - started
            live = generation_service_pb2.GenerationFilter(statuses=_LIVE)
            while True:
                page = await client.generations.ListGenerations(
                    generation_service_pb2.ListGenerationsRequest(page_size=1, filter=live)
                )
                if not page.generations:
                    break
                await asyncio.sleep(0.05)  # polling interval of the measurement
            completed = time.perf_counter() - started
    return {"generations": count, "serving_s": serving, "all_completed_s": completed}


def main() -> None:
    """Run the figures and print them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--watchers", default="1,10,100,1000")
    parser.add_argument("--recovery", type=int, default=1000)
    args = parser.parse_args()

    async def run() -> None:
        print(
            f"{'watchers':>8} {'events/s':>10} {'echo msg/s':>10} {'vs echo':>8} "
            f"{'burst p99':>9} {'p50 ms':>8} {'p99 ms':>8} {'echo p99':>8} {'B/idle stream':>14}"
        )
        for n in (int(x) for x in args.watchers.split(",")):
            echo = await echo_streams(n)
            echo_p99 = _percentile(await echo_latency(n, PACED_EVENTS, PACE), 0.99) * 1e3
            r = await fan_out(n)
            print(
                f"{n:>8} {r['per_s']:>10.0f} {echo:>10.0f} {r['per_s'] / echo:>8.1%} "
                f"{r['burst_p99_ms']:>9.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                f"{echo_p99:>8.1f} {r['bytes_per_idle_stream']:>14.0f}"
            )
        if args.recovery:
            r = await recovery(args.recovery)
            print(
                f"recovery of {args.recovery}: serving after {r['serving_s']:.2f} s, "
                f"all completed after {r['all_completed_s']:.2f} s"
            )

    asyncio.run(run())


if __name__ == "__main__":
    main()
