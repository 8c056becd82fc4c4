"""Status delay, push vs poll: from a task finishing on the compute server to the service.

    python -m benchmarks.push [--mode push|poll|both] [--tasks 50] [--size 64]
        [--fleet redis://127.0.0.1:6379/9]

The project's compute server (``python -m server.compute.server``, embedded board, two
workers) and the service (``python -m server`` with ``SARTIQ_COMPUTE__BACKEND=http``), each
in its own process, on this machine; the service follows each task on its events stream
(push) or polls its status (``SARTIQ_COMPUTE__PUSH=false``: backoff from 50 ms to 1 s,
back to 50 ms at each change). A fresh service per mode, the same compute server.

Generations (GENERATE, one prediction, ``--size`` pixels square) run one at a time; for
each, the delay runs from the compute server's ``completed_at`` (its task answer, asked
directly) to the moment this process's ``WatchGeneration`` stream delivers the task's
COMPLETED event ("seen"), and to that event's own time ("recorded": when the service
recorded it, before its commit). The service downloads and verifies the output between
the two ends, so each figure includes one output download; the two modes differ only in
how the service learns that the task ended. The clocks are one machine's wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import httpx

from benchmarks.common import png
from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import enums_pb2
from server.compute.wire import TaskAnswer, parse, task_path

TOKEN = "bench-push-token"
_TASK_COMPLETED = enums_pb2.COMPUTE_TASK_STATUS_COMPLETED


@contextlib.asynccontextmanager
async def _process(argv: list[str], env: dict[str, str], port_file: Path) -> AsyncIterator[int]:
    """Run a server process until the block ends (SIGTERM); yields the port it wrote."""
    process = await asyncio.create_subprocess_exec(*argv, env=env)
    try:
        async with asyncio.timeout(60):
            while not await asyncio.to_thread(port_file.exists):
                if process.returncode is not None:
                    raise RuntimeError(f"{argv} exited with {process.returncode}")
                await asyncio.sleep(0.05)  # polling for the port file the server writes
        yield int(await asyncio.to_thread(port_file.read_text))
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await process.wait()


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARTIQ_")}
    env.update(settings)
    return env


@contextlib.asynccontextmanager
async def compute_server(workdir: Path, fleet: str = "") -> AsyncIterator[int]:
    """The compute server: embedded with two workers, or a fleet's (``fleet``: Redis).

    The fleet: one API server and one Celery worker of two processes, its own namespace.
    """
    port_file = workdir / "compute.port"
    namespace = f"bench:{os.getpid()}"
    settings = {
        "SARTIQ_COMPUTE_SERVER__PORT": "0",
        "SARTIQ_COMPUTE_SERVER__PORT_FILE": str(port_file),
        "SARTIQ_COMPUTE_SERVER__TOKEN": TOKEN,
        "SARTIQ_COMPUTE_SERVER__WORKERS": "2",
        "SARTIQ_COMPUTE_SERVER__LOG_LEVEL": "WARNING",
    }
    if fleet:
        settings.update(
            SARTIQ_COMPUTE_SERVER__BROKER_URL=fleet,
            SARTIQ_COMPUTE_SERVER__STORAGE__URL=f"file://{workdir / 'storage'}",
            SARTIQ_COMPUTE_SERVER__NAMESPACE=namespace,
        )
    env = _env(**settings)
    async with _process([sys.executable, "-m", "server.compute.server"], env, port_file) as port:
        if not fleet:
            yield port
            return
        argv = [sys.executable, "-m", "server.compute.fleet.worker", "--concurrency=2"]
        worker = await asyncio.create_subprocess_exec(*argv, env=env, start_new_session=True)
        try:
            yield port
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            await worker.wait()


def service(
    workdir: Path, compute_url: str, *, push: bool
) -> contextlib.AbstractAsyncContextManager[int]:
    """The service over the HTTP adapter to ``compute_url``."""
    port_file = workdir / "port"
    env = _env(
        SARTIQ_SERVER__PORT="0",
        SARTIQ_SERVER__PORT_FILE=str(port_file),
        SARTIQ_SERVER__GRACE_PERIOD="1",
        SARTIQ_DATABASE__URL=f"sqlite+aiosqlite:///{workdir / 'bench.db'}",
        SARTIQ_MEDIA__ARTIFACT_DIR=str(workdir / "artifacts"),
        SARTIQ_COMPUTE__BACKEND="http",
        SARTIQ_COMPUTE__URL=compute_url,
        SARTIQ_COMPUTE__TOKEN=TOKEN,
        SARTIQ_COMPUTE__PUSH="true" if push else "false",
        SARTIQ_LOG_LEVEL="WARNING",
    )
    return _process([sys.executable, "-m", "server"], env, port_file)


@dataclass(frozen=True)
class Delays:
    """One mode's delays, in seconds, one per task."""

    mode: str
    seen: list[float]
    recorded: list[float]


async def measure(mode: str, compute_url: str, *, tasks: int, size: int) -> Delays:
    """Run ``tasks`` generations one at a time on a fresh service; their delays."""
    seen: list[float] = []
    recorded: list[float] = []
    headers = {"authorization": f"Bearer {TOKEN}"}
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            service(Path(tmp), compute_url, push=mode == "push") as port,
            SartiqClient(f"127.0.0.1:{port}") as client,
            httpx.AsyncClient(base_url=compute_url, headers=headers) as http,
        ):
            product = await client.create_entity("product", "Dress", images=[png()])
            for _ in range(tasks + 1):  # the first one warms the service and its pools
                generation = await client.generate(
                    product_id=product.id,
                    shot_type_string="front",
                    batch_size=1,
                    width=size,
                    height=size,
                )
                compute_id, at, made = "", 0.0, 0.0
                async for event in client.watch(generation.id):
                    completed = event.HasField("task") and event.task.status == _TASK_COMPLETED
                    if completed and not compute_id:
                        at = time.time()
                        compute_id = event.task.compute_task_id
                        made = event.event_time.ToDatetime(tzinfo=UTC).timestamp()
                if not compute_id:
                    raise RuntimeError(f"generation {generation.id} did not complete")
                answer = parse(TaskAnswer, (await http.get(task_path(compute_id))).content)
                if answer.completed_at is None:
                    raise RuntimeError(f"task {compute_id} has no completed_at")
                finished = answer.completed_at.timestamp()
                seen.append(at - finished)
                recorded.append(made - finished)
    return Delays(mode, seen[1:], recorded[1:])


def _ms(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def report(results: list[Delays], size: int) -> None:
    """One line per mode and end."""
    print(f"status delay, compute completed_at -> the service ({size}x{size} GENERATE, ms)")
    print(f"{'mode':<6} {'end':<9} {'tasks':>5} {'p50':>8} {'p99':>8} {'mean':>8} {'max':>8}")
    for delays in results:
        for end, values in (("seen", delays.seen), ("recorded", delays.recorded)):
            mean = 1000 * statistics.fmean(values)
            print(
                f"{delays.mode:<6} {end:<9} {len(values):>5} {_ms(values, 0.5):>8.1f} "
                f"{_ms(values, 0.99):>8.1f} {mean:>8.1f} {1000 * max(values):>8.1f}"
            )


async def run(args: argparse.Namespace) -> None:
    """Measure the modes asked for against one compute server."""
    modes = ["push", "poll"] if args.mode == "both" else [args.mode]
    with tempfile.TemporaryDirectory() as tmp:
        async with compute_server(Path(tmp), args.fleet) as port:
            url = f"http://127.0.0.1:{port}"
            results = [await measure(mode, url, tasks=args.tasks, size=args.size) for mode in modes]
    report(results, args.size)


def main() -> None:
    """Parse the arguments and measure."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=("push", "poll", "both"), default="both")
    parser.add_argument("--tasks", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="pixels, width and height")
    parser.add_argument(
        "--fleet", default="", help="a Redis URL: measure against a fleet (API server + worker)"
    )
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
