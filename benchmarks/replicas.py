"""CPU per create on SQLite and on PostgreSQL with one and several workers (DESIGN §10).

    python -m benchmarks.replicas [--seconds 5] [--callers 100] [--workers 1,2]
                                  [--postgres postgresql+asyncpg://...] [--takeover 40]
                                  [--slots 100000] [--lease 4]

Each server is its own process tree (``python -m benchmarks.fleet``: a supervisor and its
workers when there are several, on one port with SO_REUSEPORT). The harness reads the
tree's CPU time from /proc before and after the load and reports CPU milliseconds per
call beside a bare grpc.aio echo server's, measured the same way in the same run: on
these 2-core machines, shared with the load generator, CPU per call says more than calls
per second. The load comes over several channels (the kernel spreads connections, not
calls, over the workers). ``creates`` run against a compute backend that holds every task,
``end to end`` (create + watch to the terminal event) against one that completes at once.

``--takeover N`` (PostgreSQL): replica A (a backend that holds every task) creates N
generations, then is killed with SIGKILL; the harness times, against the lease, until
replica B has claimed every one (read from the database) and until B has completed them
(B's backend completes at once; a task A's backend held is unknown to B's, so B submits it
again under its key, as after a compute server that forgot it). DESIGN §10: all resumed
within lease + 2 s.

The PostgreSQL figures need a server (``--postgres``, else ``SARTIQ_BENCH_POSTGRES_URL`` or
``SARTIQ_TEST_POSTGRES_URL``); each run gets a database of its own, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import text

from benchmarks.common import png, server_process
from benchmarks.harness import Result, load
from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2, resources_pb2
from scripts.pgtemp import fresh_database
from server.config import DatabaseSettings
from server.store.db import create_engine

_TICKS = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process ``root`` and every process below it, now."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        times[pid] = (int(fields[11]) + int(fields[12])) / _TICKS
    tree = {root}
    grew = True
    while grew:
        below = {pid for pid, parent in parents.items() if parent in tree} - tree
        grew = bool(below)
        tree |= below
    return sum(times.get(pid, 0.0) for pid in tree)


@dataclass
class Fleet:
    """A running ``benchmarks.fleet`` process tree."""

    process: asyncio.subprocess.Process
    port: int

    @property
    def target(self) -> str:
        """host:port of its one port."""
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        """CPU seconds of the supervisor (if any) and every worker so far."""
        return tree_cpu_seconds(self.process.pid)


@contextlib.asynccontextmanager
async def fleet(
    workdir: Path,
    database_url: str,
    *,
    workers: int,
    hold: bool,
    slots: int = 100_000,
    **settings: str,
) -> AsyncIterator[Fleet]:
    """Start ``workers`` replicas of the service on one port; SIGTERM them afterwards."""
    port_file = workdir / "port"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARTIQ_")}
    env.update(
        SARTIQ_DATABASE__URL=database_url,
        SARTIQ_SERVER__PORT="0",
        SARTIQ_SERVER__PORT_FILE=str(port_file),
        SARTIQ_SERVER__WORKERS=str(workers),
        SARTIQ_SERVER__GRACE_PERIOD="1",
        SARTIQ_SERVER__MAX_CONNECTION_AGE="0",  # the load's connections stay put
        SARTIQ_MEDIA__ARTIFACT_DIR=str(workdir / "artifacts"),
        # Creates against a holding backend pile up live generations: measure the
        # service, not the admission bounds.
        SARTIQ_ORCHESTRATION__MAX_QUEUED_GENERATIONS="1000000",
        SARTIQ_ORCHESTRATION__MAX_LIVE_PER_ORGANIZATION="1000000",
        # By default every generation gets its workflow at once (--slots to change it);
        # a replica with none free leaves new ones to the deployment's line.
        SARTIQ_ORCHESTRATION__MAX_TASKS_IN_FLIGHT=str(slots),
        SARTIQ_LOG_LEVEL="WARNING",
    )
    env.update({f"SARTIQ_{k.upper()}": v for k, v in settings.items()})
    argv = [sys.executable, "-m", "benchmarks.fleet", "hold" if hold else "instant"]
    process = await asyncio.create_subprocess_exec(*argv, env=env)
    try:
        async with asyncio.timeout(120):
            while not port_file.exists():
                if process.returncode is not None:
                    raise RuntimeError(f"the fleet exited with {process.returncode}")
                await asyncio.sleep(0.05)  # polling for the port file the supervisor writes
        yield Fleet(process, int(port_file.read_text()))
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await process.wait()


def _request(product_id: str) -> generation_service_pb2.CreateGenerateGenerationRequest:
    return generation_service_pb2.CreateGenerateGenerationRequest(
        params=resources_pb2.GenerateParams(
            product_id=product_id, shot_type_string="front", width=64, height=64
        )
    )


@dataclass(frozen=True)
class Measured:
    """One figure: the load's result and the server tree's CPU per call."""

    label: str
    result: Result
    cpu_ms_per_call: float


async def _measure(
    label: str,
    cpu: Callable[[], float],
    calls: Callable[[int], Callable[[], Awaitable[object]]],
    *,
    channels: int,
    callers: int,
    seconds: float,
) -> Measured:
    """Load with ``callers`` spread over ``channels``; the CPU the server spent per call."""
    turn = itertools.count()
    each = [calls(n) for n in range(channels)]

    async def call() -> object:
        return await each[next(turn) % channels]()

    before = cpu()
    result = await load(label, call, callers, seconds)
    spent = cpu() - before
    return Measured(label, result, spent * 1e3 / max(result.calls, 1))


async def echo_figure(*, channels: int, callers: int, seconds: float) -> Measured:
    """The bare grpc.aio server's CPU per unary call under the same load."""
    async with server_process("echo") as echo, contextlib.AsyncExitStack() as stack:
        unaries = []
        for _ in range(channels):
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(echo.target))
            unaries.append(channel.unary_unary("/bench.Echo/Unary", None, None))
        payload = b"x" * 64
        return await _measure(
            "echo unary",
            lambda: tree_cpu_seconds(echo.pid),
            lambda n: lambda: unaries[n](payload),
            channels=channels,
            callers=callers,
            seconds=seconds,
        )


async def service_figure(
    figure: str,
    database_url: str,
    *,
    workers: int,
    slots: int,
    channels: int,
    callers: int,
    seconds: float,
) -> Measured:
    """Creates or end-to-end generations on a fresh fleet of ``workers`` replicas."""
    label = f"{figure} {'sqlite' if database_url.startswith('sqlite') else 'postgres'} x{workers}"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        async with (
            fleet(
                workdir, database_url, workers=workers, hold=figure == "create", slots=slots
            ) as running,
            contextlib.AsyncExitStack() as stack,
        ):
            clients = [
                await stack.enter_async_context(SartiqClient(running.target))
                for _ in range(channels)
            ]
            product = await clients[0].create_entity("product", "bench", images=[png()])
            request = _request(product.id)

            def create(n: int) -> Callable[[], Awaitable[object]]:
                async def call() -> object:
                    return await clients[n].generations.CreateGenerateGeneration(request)

                return call

            def end_to_end(n: int) -> Callable[[], Awaitable[object]]:
                async def call() -> object:
                    created = await clients[n].generations.CreateGenerateGeneration(request)
                    async for _ in clients[n].watch(created.generation.id):
                        pass
                    return created

                return call

            return await _measure(
                label,
                running.cpu_seconds,
                create if figure == "create" else end_to_end,
                channels=channels,
                callers=callers,
                seconds=seconds,
            )


@dataclass(frozen=True)
class Takeover:
    """How long a killed replica's generations waited for another replica."""

    generations: int
    lease_s: float
    claimed_s: float  # from the kill until the survivor held every one
    completed_s: float  # ... until every one was COMPLETED


async def takeover_figure(database_url: str, *, generations: int, lease: float) -> Takeover:
    """Kill a replica holding ``generations``; time the survivor's claim and completion."""
    engine = create_engine(DatabaseSettings(url=database_url))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "a").mkdir()
            (Path(tmp) / "b").mkdir()

            def replica(name: str, *, hold: bool) -> AbstractAsyncContextManager[Fleet]:
                return fleet(
                    Path(tmp) / name,
                    database_url,
                    workers=1,
                    hold=hold,
                    orchestration__lease_seconds=str(lease),
                )

            async with (
                replica("b", hold=False) as b,
                replica("a", hold=True) as a,
                SartiqClient(a.target) as client,
                SartiqClient(b.target) as survivor,
            ):
                product = await client.create_entity("product", "bench", images=[png()])
                request = _request(product.id)
                ids = [
                    (await client.generations.CreateGenerateGeneration(request)).generation.id
                    for _ in range(generations)
                ]
                a.process.kill()
                killed = asyncio.get_running_loop().time()
                await a.process.wait()
                claimed = await _elapsed_until(lambda: _all_claimed(engine, ids), killed)
                completed = await _elapsed_until(lambda: _all_completed(survivor, ids), killed)
    finally:
        await engine.dispose()
    return Takeover(generations, lease, claimed, completed)


async def _elapsed_until(condition: Callable[[], Awaitable[bool]], since: float) -> float:
    """Seconds from ``since`` until ``condition`` holds (polled every 20 ms, 120 s at most)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(120):
        while not await condition():  # noqa: ASYNC110 - polls other processes
            await asyncio.sleep(0.02)
    return loop.time() - since


async def _all_claimed(engine: Any, ids: list[str]) -> bool:
    """Whether every generation of ``ids`` has been claimed again (its fence raised)."""
    async with engine.connect() as connection:
        query = text("SELECT count(*) FROM generations WHERE id = ANY(:ids) AND fence > 0")
        return int((await connection.execute(query, {"ids": ids})).scalar()) == len(ids)


async def _all_completed(client: SartiqClient, ids: list[str]) -> bool:
    for generation_id in ids:
        got = await client.generations.GetGeneration(
            generation_service_pb2.GetGenerationRequest(generation_id=generation_id)
        )
        if not got.generation.done:
            return False
    return True


def report(rows: list[Measured], echo: Measured) -> None:
    """One table: rate, latency and CPU per call against the echo server's."""
    print(
        f"{'figure':<26} {'calls':>7} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'refused':>7} {'CPU ms/call':>11} {'x echo':>7}"
    )
    for row in [echo, *rows]:
        r = row.result
        print(
            f"{row.label:<26} {r.calls:>7} {r.rate:>8.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
            f"{r.refused:>7} {row.cpu_ms_per_call:>11.3f} "
            f"{row.cpu_ms_per_call / echo.cpu_ms_per_call:>7.2f}"
        )


async def run(args: argparse.Namespace) -> None:
    """Every figure the arguments ask for, then one table."""
    load = {"channels": args.channels, "callers": args.callers, "seconds": args.seconds}
    slots = args.slots
    echo = await echo_figure(**load)
    rows: list[Measured] = []
    for figure in ("create", "end to end"):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
            rows.append(await service_figure(figure, url, workers=1, slots=slots, **load))
        if not args.postgres:
            continue
        for workers in args.workers:
            async with fresh_database(args.postgres, prefix="sartiq_bench") as url:
                rows.append(await service_figure(figure, url, workers=workers, slots=slots, **load))
    report(rows, echo)
    if not args.postgres:
        print("PostgreSQL figures skipped: no --postgres URL (or SARTIQ_BENCH_POSTGRES_URL)")
        return
    if args.takeover:
        async with fresh_database(args.postgres, prefix="sartiq_bench") as url:
            t = await takeover_figure(url, generations=args.takeover, lease=args.lease)
        print(
            f"takeover of {t.generations} generations (lease {t.lease_s:.1f} s): all claimed "
            f"{t.claimed_s:.2f} s after the kill, all completed after {t.completed_s:.2f} s "
            f"(target: lease + 2 s = {t.lease_s + 2:.1f} s)"
        )


def main() -> None:
    """Parse the arguments and measure."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--workers", default="1,2", help="PostgreSQL worker counts")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("SARTIQ_BENCH_POSTGRES_URL")
        or os.environ.get("SARTIQ_TEST_POSTGRES_URL", ""),
    )
    parser.add_argument(
        "--slots",
        type=int,
        default=100_000,
        help="SARTIQ_ORCHESTRATION__MAX_TASKS_IN_FLIGHT of the servers (8: the default, "
        "where creates past 16 running wait, on PostgreSQL in the deployment's line)",
    )
    parser.add_argument("--takeover", type=int, default=40, help="generations (0: skip)")
    parser.add_argument("--lease", type=float, default=4.0, help="lease seconds (takeover)")
    args = parser.parse_args()
    args.workers = [int(n) for n in args.workers.split(",")]
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
