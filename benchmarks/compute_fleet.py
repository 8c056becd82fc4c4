"""Task throughput of the compute fleet with one and with two workers (real Redis, Celery).

    python -m benchmarks.compute_fleet [--tasks 200] [--workers 1,2] [--side 768]
        [--redis redis://127.0.0.1:6379/9]

For each worker count: one API server and that many workers (one process each), in a
namespace of their own; ``--tasks`` IMAGE_ADJUSTER tasks on a ``--side`` square photo-like
image are submitted at once (16 at a time), and the time from the first submit to the last
task ended is measured. Also reports the embedded one-process server (its
``--embedded-workers`` worker processes) on the same tasks, as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from PIL import Image

from server.compute.wire import HealthAnswer, TaskAnswer, parse

TOKEN = "bench-token"


def _image(side: int) -> str:
    buffer = io.BytesIO()
    Image.effect_mandelbrot((side, side), (-2, -1.5, 1, 1.5), 60).convert("RGB").save(
        buffer, format="PNG"
    )
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


async def _spawn(argv: list[str], env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=out, stderr=out, start_new_session=True
        )


async def _port(port_file: Path, process: asyncio.subprocess.Process) -> int:
    deadline = time.monotonic() + 60
    while not await asyncio.to_thread(port_file.exists):
        if process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError("the compute API server did not start")
        await asyncio.sleep(0.05)
    return int(await asyncio.to_thread(port_file.read_text))


@asynccontextmanager
async def _compute(
    directory: Path, workers: int, redis_url: str, embedded_workers: int
) -> AsyncIterator[str]:
    """A compute server (a fleet when ``workers`` > 0, else embedded); yields its URL."""
    namespace = f"bench:{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARTIQ_")}
    env.update(
        SARTIQ_COMPUTE_SERVER__TOKEN=TOKEN,
        SARTIQ_COMPUTE_SERVER__PORT="0",
        SARTIQ_COMPUTE_SERVER__PORT_FILE=str(directory / "api.port"),
        SARTIQ_COMPUTE_SERVER__LOG_LEVEL="WARNING",
        SARTIQ_COMPUTE_SERVER__MAX_WAITING="100000",
        SARTIQ_COMPUTE_SERVER__WORKERS=str(embedded_workers),
    )
    if workers:
        env.update(
            SARTIQ_COMPUTE_SERVER__BROKER_URL=redis_url,
            SARTIQ_COMPUTE_SERVER__STORAGE__URL=f"file://{directory / 'storage'}",
            SARTIQ_COMPUTE_SERVER__NAMESPACE=namespace,
        )
    processes = [
        await _spawn([sys.executable, "-m", "server.compute.server"], env, directory / "api.log")
    ]
    try:
        for n in range(workers):
            argv = [sys.executable, "-m", "server.compute.fleet.worker", f"--name=w{n}@bench"]
            processes.append(await _spawn(argv, env, directory / f"worker{n}.log"))
        url = f"http://127.0.0.1:{await _port(directory / 'api.port', processes[0])}"
        async with httpx.AsyncClient(base_url=url) as http:
            deadline = time.monotonic() + 60
            while workers and (
                parse(HealthAnswer, (await http.get("/health")).content).capacity.workers < workers
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("the workers did not start")
                await asyncio.sleep(0.1)
        yield url
    finally:
        for process in processes:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            await process.wait()
        if workers:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(redis_url)
            async for key in client.scan_iter(match=f"{namespace}:*"):
                await client.delete(key)
            async for key in client.scan_iter(match=f"{namespace.replace(':', '.')}.*"):
                await client.delete(key)
            await client.aclose()


async def _run(url: str, tasks: int, image: str) -> float:
    """Seconds from the first submit to the last task ended."""
    headers = {"authorization": f"Bearer {TOKEN}"}
    limit = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        before = parse(HealthAnswer, (await http.get("/health")).content).tasks_ended
        run = uuid.uuid4().hex[:8]

        async def submit(n: int) -> str:
            body = {
                "task_type": "IMAGE_ADJUSTER",
                "parameters": {"base_image": image, "brightness": (n % 100) / 200, "seed": n},
                "idempotency_key": f"{run}-{n}",
            }
            async with limit:
                answer = await http.post("/api/v1/tasks/", json=body)
            return parse(TaskAnswer, answer.content).id

        started = time.monotonic()
        ids = await asyncio.gather(*(submit(n) for n in range(tasks)))
        while True:
            health = parse(HealthAnswer, (await http.get("/health")).content)
            if health.tasks_ended - before >= tasks:
                break
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - started
        last = parse(TaskAnswer, (await http.get(f"/api/v1/tasks/{ids[-1]}")).content)
        if last.status != "completed":
            raise RuntimeError(f"a task ended {last.status}: {last.error_message}")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--side", type=int, default=768)
    parser.add_argument("--embedded-workers", type=int, default=2)
    parser.add_argument(
        "--redis", default=os.environ.get("SARTIQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
    )
    args = parser.parse_args()
    image = _image(args.side)
    print(f"{args.tasks} IMAGE_ADJUSTER tasks on {args.side}x{args.side}, 16 submits at a time")
    print(f"{'compute server':<34}{'seconds':>9}{'tasks/s':>9}")
    runs = [("embedded", 0)] + [
        (f"fleet, {n} worker{'s' if n > 1 else ''}", n)
        for n in (int(w) for w in args.workers.split(","))
    ]
    for name, workers in runs:
        if workers == 0:
            name = f"embedded ({args.embedded_workers} worker processes)"
        with tempfile.TemporaryDirectory(prefix="sartiq-fleet-bench-") as tmp:
            async with _compute(Path(tmp), workers, args.redis, args.embedded_workers) as url:
                await _run(url, min(20, args.tasks), image)  # warm up
                seconds = await _run(url, args.tasks, image)
        print(f"{name:<34}{seconds:>9.2f}{args.tasks / seconds:>9.1f}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
