"""Creates answered while the local backend renders on the same machine (issue 17, item 7).

    python -m benchmarks.local_compute [--seconds 10] [--callers 100] [--rounds 1]
                                       [--admission default|lifted|both] [--profile DIR]

The server is the embedded default of ``make run`` (SQLite, the real local compute
backend) in its own process (``benchmarks.servers local``). ``--callers`` callers create
small GENERATE generations (64x64, batch 1) continuously; the service renders them
meanwhile. Target: create p99 < 250 ms at 100 callers.

Two cases. ``default``: the default admission limits, as ``make run`` has them. Renders
are slower than creates, so the organization soon has 500 generations in progress and
further creates are refused (RESOURCE_EXHAUSTED, each caller then waits its RetryInfo
delay, 2 s): from then on creates are accepted as fast as generations end, and their
latency is the callers still calling divided by that rate. ``lifted``: no admission
limit, so no create is refused: how fast the event loop answers creates while the
renders go on behind (the backlog grows).

Each round measures a bare grpc.aio echo server at the same load first. Reported:
creates per second, p50, p99, creates refused, compute tasks ended per second during the
load, CPU seconds of the server process, of the processes below it (the compute
workers) and of this one (the load), and, from the kernel (the main thread's
schedstat), the share of the load's time the event loop's thread ran on a CPU and the
share it was ready to run but waited for one (CPU share; a thread waiting for the GIL is
asleep, not runnable). Warm-up: 4 callers until the workers have ended 20 tasks, then
the load runs continuously and its first ``WARM_UP_S`` seconds are not counted, so the
window measures its steady state (with the default limits: the organization at its
limit, refused callers waiting out their delays). Counted from the moment every caller
starts at once, that one burst of 100 creates set the p99 of earlier runs.

``--profile DIR`` also samples the server process with py-spy during the load (needs
``py-spy`` in the environment; native sampling stops the process 20 times a second, so a
profiled round's figures are lower): ``all.txt`` (every thread, native frames included)
and ``gil.txt`` (the thread holding the GIL), both collapsed stacks (flamegraph.pl
input). The summary says how the event loop's thread spent its samples (waiting for the
GIL, idle in epoll_wait, or running) and which threads held the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import ServerProcess, png, server_process
from benchmarks.harness import Result, _echo, load
from benchmarks.replicas import tree_cpu_seconds
from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2, resources_pb2

_TICKS = os.sysconf("SC_CLK_TCK")
WARM_UP_S = 3.0


@dataclass(frozen=True)
class Round:
    """One measurement of the service with its compute work, and its echo baseline."""

    admission: str  # "default" limits, or "lifted"
    echo: Result
    creates: Result
    tasks_ended: int  # compute tasks that ended during the load
    server_cpu_s: float  # the server process alone (its event loop and its threads)
    workers_cpu_s: float  # the processes below it
    loop_on_cpu: float  # share of the load's time the event loop's thread ran
    loop_runnable: float  # share it was ready to run but waited for a CPU
    client_cpu_s: float  # this process, the load generator


def _process_cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _loop_schedstat(pid: int) -> tuple[int, int]:
    """Nanoseconds the main thread has run on a CPU, and waited on a run queue for one."""
    run, wait, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    return int(run), int(wait)


async def _tasks_ended(server: ServerProcess, root: Path) -> int:
    """The compute tasks the server's backend has ended so far (it writes them on SIGUSR1)."""
    answer = root / "compute.json"
    answer.unlink(missing_ok=True)
    os.kill(server.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not answer.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not write its compute counts")
        await asyncio.sleep(0.01)
    ended: int = json.loads(answer.read_text())["ended"]
    return ended


@contextlib.asynccontextmanager
async def _py_spy(pid: int, seconds: float, out: Path | None) -> AsyncIterator[None]:
    """Sample ``pid`` with py-spy for ``seconds`` while the body runs (nothing if no ``out``).

    ``all.txt``: every thread, idle or not, with native frames, 20 times a second (py-spy
    stops the process for each such sample, so the rate is low); ``gil.txt``: only the
    thread holding the GIL, 100 times a second, without stopping the process.
    """
    if out is None:
        yield
        return
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    os.makedirs(out, exist_ok=True)
    common = ["record", "--pid", str(pid), "--duration", str(int(seconds)), "--format", "raw"]
    common.append("--threads")
    runs = {
        "all.txt": ["--idle", "--native", "--rate", "20"],
        "gil.txt": ["--gil", "--nonblocking", "--rate", "100"],
    }
    with (out / "py-spy.log").open("wb") as log:
        spies = [
            await asyncio.create_subprocess_exec(
                spy, *common, *extra, "-o", str(out / name), stdout=log, stderr=log
            )
            for name, extra in runs.items()
        ]
        try:
            yield
        finally:
            for run in spies:
                await run.wait()


# CPython 3.11 takes the GIL in take_gil (inlined into its callers): a mutex, then a wait on
# a condition, both futex waits in libc; drop_gil's forced switch waits on a condition too.
# libc's frames are often unnamed, but the low 12 bits of an address survive ASLR: the
# futex wait under those calls ends in ...bcae called from ...4193 in this libc.
_GIL_WAIT = re.compile(
    r"pthread_cond_timedwait|pthread_cond_wait|pthread_mutex_lock"
    r"|0x[0-9a-f]+bcae \(libc[^;]*;0x[0-9a-f]+4193"
)


def _loop_states(path: Path) -> collections.Counter[str]:
    """The main thread's native samples: waiting for the GIL, idle in epoll, running."""
    states: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        if "epoll_wait" in frames[-1]:
            state = "idle in epoll_wait"
        elif _GIL_WAIT.search(";".join(frames[-3:])):
            state = "waiting for the GIL"
        else:
            state = "running (or waiting for a CPU)"
        states[state] += int(count)
    return states


def _gil_holders(path: Path) -> collections.Counter[str]:
    """Samples by the thread holding the GIL (thread pools' numbers dropped)."""
    holders: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        name = stack.split(";")[0].split(": ")[-1].rstrip("_0123456789") or "unnamed"
        holders[name] += int(count)
    return holders


def _loop_thread_summary(out: Path) -> str:
    """How the event loop's thread spent its samples, and who held the GIL."""
    states = _loop_states(out / "all.txt")
    total = sum(states.values()) or 1
    parts = ", ".join(f"{name} {n / total:.0%}" for name, n in states.most_common())
    holders = _gil_holders(out / "gil.txt")
    samples = 100 * (sum(states.values()) / 20 or 1)  # the --gil run samples 5x as often
    held = ", ".join(f"{name} {n / samples:.0%}" for name, n in holders.most_common(4))
    return f"event loop thread ({total} samples): {parts}; GIL held by: {held}"


async def measure(
    callers: int, seconds: float, profile: Path | None, *, lifted: bool, echo: Result
) -> Round:
    """The service with the local backend (admission limits ``lifted`` or the defaults)."""
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            server_process("local", tmp, *(["lifted"] if lifted else [])) as server,
            SartiqClient(server.target) as client,
        ):
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

            # Start the workers (until they have ended a few tasks each), then one
            # continuous load: WARM_UP_S of it first, so that the window measures its
            # steady state, not the burst of every caller starting at once.
            root = Path(tmp)
            warm = time.monotonic() + 60
            while await _tasks_ended(server, root) < 20 and time.monotonic() < warm:
                await load("warm-up", create, 4, 0.5)
            at_open: dict[str, float] = {}
            spy = contextlib.AsyncExitStack()

            async def window_opens() -> None:
                at_open["ended"] = await _tasks_ended(server, root)
                at_open["client"] = time.process_time()
                at_open["own"] = _process_cpu_seconds(server.pid)
                at_open["tree"] = tree_cpu_seconds(server.pid)
                at_open["run"], at_open["wait"] = _loop_schedstat(server.pid)
                await spy.enter_async_context(_py_spy(server.pid, seconds, profile))

            async with spy:
                result = await load(
                    "create", create, callers, seconds, warm_up=WARM_UP_S, on_window=window_opens
                )
            run_after, wait_after = _loop_schedstat(server.pid)
            own_after = _process_cpu_seconds(server.pid)
            tree_after = tree_cpu_seconds(server.pid)
            client_cpu = time.process_time() - at_open["client"]
            ended_after = await _tasks_ended(server, root)
    own, tree, run, wait = at_open["own"], at_open["tree"], at_open["run"], at_open["wait"]
    ended = int(at_open["ended"])
    own_s = own_after - own
    window_ns = result.seconds * 1e9
    return Round(
        "lifted" if lifted else "default",
        echo,
        result,
        ended_after - ended,
        own_s,
        (tree_after - tree) - own_s,
        (run_after - run) / window_ns,
        (wait_after - wait) / window_ns,
        client_cpu,
    )


def report(rounds: list[Round]) -> None:
    """One line per measurement."""
    print(
        f"{'admission':<9} {'echo/s':>7} {'echo p99':>8} {'creates/s':>9} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'refused':>7} {'tasks/s':>7} {'cpu srv s':>9} {'cpu wrk s':>9} "
        f"{'cpu client s':>12} {'loop on cpu':>11} {'loop runnable':>13}"
    )
    for r in rounds:
        c = r.creates
        print(
            f"{r.admission:<9} {r.echo.rate:>7.0f} {r.echo.p99_ms:>8.1f} {c.rate:>9.1f} "
            f"{c.p50_ms:>7.1f} {c.p99_ms:>7.1f} {c.refused:>7} {r.tasks_ended / c.seconds:>7.1f} "
            f"{r.server_cpu_s:>9.2f} {r.workers_cpu_s:>9.2f} {r.client_cpu_s:>12.2f} "
            f"{r.loop_on_cpu:>11.0%} {r.loop_runnable:>13.0%}",
            flush=True,
        )


def main() -> None:
    """Measure, print the table (and the profile's summary)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--admission", choices=["default", "lifted", "both"], default="both")
    parser.add_argument("--profile", type=Path, default=None, help="py-spy output directory")
    args = parser.parse_args()
    cases = {"both": [False, True], "default": [False], "lifted": [True]}[args.admission]

    async def run() -> None:
        rounds = []
        for n in range(args.rounds):
            (echo,) = await _echo([args.callers], args.seconds)
            for lifted in cases:
                name = f"round{n + 1}-{'lifted' if lifted else 'default'}"
                out = args.profile / name if args.profile else None
                rounds.append(
                    await measure(args.callers, args.seconds, out, lifted=lifted, echo=echo)
                )
                if out is not None:
                    print(f"{name}: {_loop_thread_summary(out)}", flush=True)
        report(rounds)

    asyncio.run(run())


if __name__ == "__main__":
    main()
