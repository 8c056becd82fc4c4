"""Killing either side of remote compute mid-task, as a crash would.

The generation service and the compute server both run as real processes; SIGKILL gives
neither a chance to clean up.
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
from google.protobuf import duration_pb2
from helpers import assert_eventually, wait_terminal
from PIL import Image
from procs import ServerProcess

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, resources_pb2

TOKEN = "kill-test-token"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.effect_mandelbrot((512, 512), (-2, -1.5, 1, 1.5), 100).convert("RGB").save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


async def _tasks_created(compute: ServerProcess) -> int:
    async with httpx.AsyncClient() as client:
        created: int = (await client.get(f"{compute.url}/health")).json()["tasks_created"]
    return created


async def _start_video(client: SartiqClient) -> str:
    """A VIDEO generation long enough to be killed in the middle (10 s at 24 fps)."""
    sha = (await client.upload(_png())).sha256
    params = resources_pb2.VideoParams(
        base_image_url=f"artifact:{sha}", fps=24, duration=duration_pb2.Duration(seconds=10)
    )
    return (await client.create(params)).id


async def _running(client: SartiqClient, generation_id: str) -> bool:
    generation = await client.get(generation_id)
    task = generation.predictions[0].tasks[0]
    return task.status == enums_pb2.COMPUTE_TASK_STATUS_RUNNING and task.progress > 0


async def test_killing_the_compute_server_mid_task_ends_correct(tmp_path: Path) -> None:
    compute = ServerProcess.compute_server(tmp_path / "compute", token=TOKEN)
    (tmp_path / "compute").mkdir()
    await compute.start()
    port = compute.port
    service = ServerProcess.service(
        tmp_path,
        compute__backend="http",
        compute__url=compute.url,
        compute__token=TOKEN,
        compute__timeout="2",
        compute__breaker_reset="0.5",
    )
    await service.start()
    restarted = ServerProcess.compute_server(tmp_path / "compute", port=port, token=TOKEN)
    try:
        async with SartiqClient(service.target) as client:
            generation_id = await _start_video(client)
            await assert_eventually(lambda: _running(client, generation_id), timeout=60)
            await compute.kill()
            await restarted.start()  # same port, no memory of the task
            done = await wait_terminal(client.generations, generation_id, timeout=120)
        assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED, done.error.message
        task = done.predictions[0].tasks[0]
        assert task.attempt == 2
        assert len(task.previous_compute_task_ids) == 1
        assert done.predictions[0].artifact.frame_count == 240
        assert await _tasks_created(restarted) == 1
    finally:
        await service.stop()
        await restarted.stop()
        await compute.kill()


async def test_killing_the_service_reattaches_without_resubmitting(tmp_path: Path) -> None:
    compute = ServerProcess.compute_server(tmp_path, token=TOKEN)
    await compute.start()
    settings = {
        "compute__backend": "http",
        "compute__url": compute.url,
        "compute__token": TOKEN,
    }
    service = ServerProcess.service(tmp_path, **settings)
    await service.start()
    try:
        async with SartiqClient(service.target) as client:
            generation_id = await _start_video(client)
            await assert_eventually(lambda: _running(client, generation_id), timeout=60)
        await service.kill()
        await service.start()
        async with SartiqClient(service.target) as client:
            done = await wait_terminal(client.generations, generation_id, timeout=120)
        assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED, done.error.message
        task = done.predictions[0].tasks[0]
        assert task.attempt == 1
        assert list(task.previous_compute_task_ids) == []
        assert await _tasks_created(compute) == 1
    finally:
        await service.stop()
        await compute.stop()
