"""The service over the HTTP adapter, a fault proxy and the project's compute server.

The compute server runs in its own process for a whole test module (``compute_process``);
each test gets its own proxy and its own service (``Rig``). The rig reads the compute
server's ``/health`` directly, not through the proxy, to see every task created and ended,
and checks every completed output against what the compute server produced.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import make_settings
from faultproxy import FaultProxy
from fleet_rig import TOKEN as TOKEN
from fleet_rig import fleet_processes, requires_redis
from google.protobuf import duration_pb2
from helpers import assert_eventually, png_bytes
from PIL import Image
from procs import ServerProcess

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, resources_pb2
from server.app import App
from server.compute.wire import HealthAnswer, TaskAnswer, parse
from server.config import ComputeSettings
from server.media.probe import probe_media

COMPLETED = enums_pb2.GENERATION_STATUS_COMPLETED


@dataclass(frozen=True)
class ComputeProcess:
    """The compute server: its API servers' ports (one, or the fleet's), the first's URL."""

    ports: tuple[int, ...]
    mode: str = "embedded"

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# Each fault-proxy module runs against both modes of the compute server.
MODES = [
    pytest.param("embedded"),
    pytest.param("fleet", marks=requires_redis),
]


def compute_process(workdir: Path, mode: str = "embedded") -> Iterator[ComputeProcess]:
    """Run the compute server until the generator ends, embedded or as a fleet.

    The fleet: two API servers and two Celery workers; the proxy spreads calls over both.
    """
    if mode == "fleet":
        with fleet_processes(workdir) as ports:
            yield ComputeProcess(tuple(ports), mode)
        return
    with ServerProcess.compute_server(workdir, token=TOKEN, workers="2").running() as port:
        yield ComputeProcess((port,), mode)


@dataclass
class Rig:
    """One service talking to the compute server through ``proxy``."""

    compute: ComputeProcess
    proxy: FaultProxy
    app: App
    client: SartiqClient
    product_id: str

    async def health(self) -> HealthAnswer:
        """The compute server's own health answer (not through the proxy)."""
        async with httpx.AsyncClient() as http:
            answer = await http.get(f"{self.compute.url}/health")
        return parse(HealthAnswer, answer.content)

    async def remote_task(self, compute_id: str) -> TaskAnswer:
        """The compute server's own record of a task (not through the proxy)."""
        headers = {"authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(headers=headers) as http:
            answer = await http.get(f"{self.compute.url}/api/v1/tasks/{compute_id}")
        return parse(TaskAnswer, answer.content)

    async def nothing_left_running(self, timeout: float = 20.0) -> HealthAnswer:
        """Wait until the compute server has no task pending or running; its health then."""
        latest: list[HealthAnswer] = []

        async def settled() -> bool:
            latest[:] = [await self.health()]
            return latest[0].live == 0 and latest[0].tasks_created == latest[0].tasks_ended

        await assert_eventually(settled, timeout=timeout, interval=0.05)
        return latest[0]

    async def generate(self, batch: int = 1) -> str:
        generation = await self.client.generate(
            product_id=self.product_id,
            shot_type_string="front",
            batch_size=batch,
            width=64,
            height=64,
        )
        return generation.id

    async def video(self, seconds: int = 20, fps: int = 30) -> str:
        """A VIDEO generation that runs for a while on the compute server."""
        sha = (await self.client.upload(_still())).sha256
        params = resources_pb2.VideoParams(
            base_image_url=f"artifact:{sha}",
            fps=fps,
            duration=duration_pb2.Duration(seconds=seconds),
        )
        return (await self.client.create(params)).id

    async def terminal(self, generation_id: str, timeout: float = 45.0) -> resources_pb2.Generation:
        latest: list[resources_pb2.Generation] = []

        async def done() -> bool:
            latest[:] = [await self.client.get(generation_id)]
            return latest[0].done

        await assert_eventually(done, timeout=timeout, interval=0.05)
        return latest[0]

    async def running(self, generation_id: str) -> bool:
        """Whether the generation's first task runs on compute with some progress."""
        task = (await self.client.get(generation_id)).predictions[0].tasks[0]
        return task.status == enums_pb2.COMPUTE_TASK_STATUS_RUNNING and task.progress > 0

    async def check_outputs(self, generation: resources_pb2.Generation, tmp: Path) -> int:
        """Every completed prediction's artifact is intact and is what compute produced.

        Returns how many were checked.
        """
        checked = 0
        for prediction in generation.predictions:
            if prediction.status != enums_pb2.PREDICTION_STATUS_COMPLETED:
                assert not prediction.artifact.sha256, "an unfinished prediction has an output"
                continue
            artifact = prediction.artifact
            path = tmp / f"{artifact.sha256}.out"
            path.unlink(missing_ok=True)
            await self.client.download(artifact.sha256, path)
            data = path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == artifact.sha256
            info = probe_media(data, max_bytes=len(data))
            assert (info.mime_type, info.width, info.height) == (
                artifact.mime_type,
                artifact.width,
                artifact.height,
            )
            task = prediction.tasks[-1]
            produced = (await self.remote_task(task.compute_task_id)).output.items
            assert [item.sha256 for item in produced] == [artifact.sha256]
            checked += 1
        return checked


@asynccontextmanager
async def rig(
    tmp_path: Path,
    compute: ComputeProcess,
    *,
    retry_budget: float = 30.0,
    timeout: float = 2.0,
    push: bool = True,
    **compute_settings: float | int,
) -> AsyncIterator[Rig]:
    """A service (its own database) reaching ``compute`` through a new fault proxy.

    ``push=False``: the service polls each task's status, never asking for its events.
    """
    proxy = FaultProxy(compute.port, also=compute.ports[1:])
    await proxy.start()
    settings = make_settings(tmp_path).model_copy(
        update={
            "compute": ComputeSettings(
                backend="http",
                url=proxy.url,
                token=TOKEN,
                timeout=timeout,
                retry_budget=retry_budget,
                push=push,
                **compute_settings,
            )
        }
    )
    app = App(settings)
    try:
        await app.start()
        async with SartiqClient(f"127.0.0.1:{app.port}") as client:
            product = await client.create_entity(
                "product", "Dress", images=[png_bytes((200, 20, 30))]
            )
            yield Rig(compute, proxy, app, client, product.id)
    finally:
        await app.shutdown()
        await proxy.close()


def _still() -> bytes:
    buffer = io.BytesIO()
    Image.effect_mandelbrot((512, 512), (-2, -1.5, 1, 1.5), 100).convert("RGB").save(
        buffer, format="PNG"
    )
    return buffer.getvalue()
