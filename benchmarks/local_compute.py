"""Creates answered while the local backend renders on the same machine (issue 17, item 7).

    python -m benchmarks.local_compute [--seconds 10] [--callers 100] [--rounds 1]
                                       [--profile DIR]

The server is the embedded default of ``make run`` (SQLite, the real local compute
backend, default admission limits) in its own process (``benchmarks.servers local``).
``--callers`` callers create small GENERATE generations (64x64, batch 1) continuously; the
service renders them meanwhile. Reported beside a bare grpc.aio echo server at the same
load, measured in the same round: creates per second, p50 and p99, creates refused with
RESOURCE_EXHAUSTED (retried after their RetryInfo delay), compute tasks finished during the
run, and the CPU seconds of the server process and of the processes below it (the
compute workers). Target: create p99 < 250 ms at 100 callers.

``--profile DIR`` also samples the server process with py-spy during the load (needs
``py-spy`` in the environment): ``all.txt`` every sample of every thread, idle ones
included, and ``gil.txt`` only the samples of the thread holding the GIL, both as
collapsed stacks (flamegraph.pl input); the summary says how the event loop's thread
spent its samples (holding the GIL, idle in epoll, waiting for the GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import png, server_process
from benchmarks.harness import Result, _echo, load
from benchmarks.replicas import tree_cpu_seconds
from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2, resources_pb2

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Round:
    """One measurement of the service with its compute work, and its echo baseline."""

    echo: Result
    creates: Result
    tasks_ended: int
    server_cpu_s: float  # the server process alone (its event loop and its threads)
    workers_cpu_s: float  # the processes below it


def _process_cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@contextlib.asynccontextmanager
async def _py_spy(pid: int, seconds: float, out: Path | None) -> AsyncIterator[None]:
    """Sample ``pid`` with py-spy for ``seconds`` while the body runs (nothing if no ``out``)."""
    if out is None:
        yield
        return
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    os.makedirs(out, exist_ok=True)
    # --nonblocking: the process is not stopped for each sample (the load is not disturbed).
    common = ["record", "--pid", str(pid), "--duration", str(int(seconds)), "--format", "raw"]
    common += ["--threads", "--nonblocking", "--rate", "100"]
    with (out / "py-spy.log").open("wb") as log:
        runs = [
            await asyncio.create_subprocess_exec(
                spy, *common, *extra, "-o", str(out / name), stdout=log, stderr=log
            )
            for name, extra in (("all.txt", ["--idle"]), ("gil.txt", ["--gil"]))
        ]
        try:
            yield
        finally:
            for run in runs:
                await run.wait()


def _main_thread_samples(path: Path) -> collections.Counter[str]:
    """The main thread's samples in a raw py-spy file, by where its stack ends."""
    found: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" in frames[0]:
            idle = frames[-1].startswith("EpollSelector.select (selectors.py")
            found["idle in epoll" if idle else "in Python"] += int(count)
    return found


def _loop_thread_summary(out: Path) -> str:
    """How the event loop's thread spent its samples.

    ``all.txt`` (every sample, idle ones too) says how often the loop waited in epoll
    for work; ``gil.txt`` (only the thread holding the GIL) how often it held the GIL.
    Both sample at the same rate over the same seconds, so the rest of the loop's
    samples outside epoll are the ones where it had work but waited for the GIL (the
    only other thing it blocks on is a short write to a socket or a pipe).
    """
    every = _main_thread_samples(out / "all.txt")
    total = sum(every.values()) or 1
    held = sum(_main_thread_samples(out / "gil.txt").values())
    epoll = every["idle in epoll"]
    waiting = max(total - epoll - held, 0)
    others = collections.Counter[str]()
    for line in (out / "gil.txt").read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        name = stack.split(";")[0].split(": ")[-1].rstrip("_0123456789")
        if "MainThread" not in name:
            others[name] += int(count)
    holders = ", ".join(f"{name} {n / total:.0%}" for name, n in others.most_common(4))
    return (
        f"event loop thread, {total} samples: holding the GIL {held / total:.0%}, idle in "
        f"epoll {epoll / total:.0%}, waiting for the GIL {waiting / total:.0%}; the GIL held "
        f"by other threads: {holders or 'none'}"
    )


async def measure(callers: int, seconds: float, profile: Path | None) -> Round:
    """One round: echo at ``callers``, then the service with the local backend."""
    (echo,) = await _echo([callers], seconds)
    with tempfile.TemporaryDirectory() as tmp:
        async with server_process("local", tmp) as server:
            async with SartiqClient(server.target) as client:
                product = await client.create_entity("product", "bench", images=[png()])
                request = generation_service_pb2.CreateGenerateGenerationRequest(
                    params=resources_pb2.GenerateParams(
                        product_id=product.id,
                        shot_type_string="front",
                        width=64,
                        height=64,
                        batch_size=1,
                    )
                )

                async def create() -> object:
                    return await client.generations.CreateGenerateGeneration(request)

                await load("warm-up", create, 4, 1.0)  # the workers start, the caches fill
                own, tree = _process_cpu_seconds(server.pid), tree_cpu_seconds(server.pid)
                async with _py_spy(server.pid, seconds, profile):
                    result = await load("create", create, callers, seconds)
                own_after, tree_after = (
                    _process_cpu_seconds(server.pid),
                    tree_cpu_seconds(server.pid),
                )
            stats = await server.stop() or {}
    own_s = own_after - own
    return Round(
        echo,
        result,
        int(stats.get("compute_ended", 0)),
        own_s,
        (tree_after - tree) - own_s,
    )


def report(rounds: list[Round]) -> None:
    """One line per round."""
    print(
        f"{'round':>5} {'echo/s':>8} {'echo p99':>8} {'creates/s':>9} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'refused':>7} {'tasks':>6} {'cpu srv s':>9} {'cpu wrk s':>9}"
    )
    for n, r in enumerate(rounds, 1):
        c = r.creates
        print(
            f"{n:>5} {r.echo.rate:>8.0f} {r.echo.p99_ms:>8.1f} {c.rate:>9.1f} {c.p50_ms:>8.1f} "
            f"{c.p99_ms:>8.1f} {c.refused:>7} {r.tasks_ended:>6} {r.server_cpu_s:>9.2f} "
            f"{r.workers_cpu_s:>9.2f}"
        )


def main() -> None:
    """Measure, print the table (and the profile's summary)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    args = parser.parse_args()

    async def run() -> None:
        rounds = []
        for n in range(args.rounds):
            out = args.profile / f"round{n + 1}" if args.profile else None
            rounds.append(await measure(args.callers, args.seconds, out))
            if out is not None:
                print(_loop_thread_summary(out), flush=True)
        report(rounds)

    asyncio.run(run())


if __name__ == "__main__":
    main()
