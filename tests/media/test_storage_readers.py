"""Compute workers read ``artifact:`` inputs through the storage seam, on the event loop.

A worker thread waits for the loop to read its input; the loop must never wait for that
thread in turn, or neither moves: closing the local backend while a read is under way is
the case that would.
"""

from __future__ import annotations

import asyncio
import io

from PIL import Image

from server.compute.base import TaskRequest
from server.compute.local import LocalComputeBackend
from server.compute.processors.tasks import default_registry
from server.domain.enums import TaskStatus, TaskType
from server.media.memory import MemoryArtifactStorage
from server.media.storage import blocking_reader


class HeldReads(MemoryArtifactStorage):
    """Reads wait until released."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()
        self.release = asyncio.Event()

    async def read(self, sha256: str) -> bytes:
        self.reading.set()
        await self.release.wait()
        return await super().read(sha256)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (90, 120, 150)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_a_worker_reads_its_input_through_the_storage() -> None:
    storage = MemoryArtifactStorage()
    blob = await storage.put(_png(), "image/png")
    backend = LocalComputeBackend(
        default_registry(),
        resolve=blocking_reader(storage, asyncio.get_running_loop()),
        workers=1,
        max_input_pixels=10**7,
    )
    try:
        request = TaskRequest(
            task_type=TaskType.IMAGE_ADJUSTER,
            params={"base_image": f"artifact:{blob.sha256}", "brightness": 0.2, "seed": 1},
            idempotency_key="reads-1",
            organization="default",
        )
        snaps = [snap async for snap in backend.watch(await backend.submit(request))]
        assert snaps[-1].status is TaskStatus.COMPLETED
        (output,) = snaps[-1].outputs
        assert (output.width, output.height) == (48, 32)
    finally:
        await backend.aclose()


async def test_closing_the_backend_while_a_worker_waits_for_a_read_does_not_hang() -> None:
    storage = HeldReads()
    blob = await storage.put(_png(), "image/png")
    backend = LocalComputeBackend(
        default_registry(),
        resolve=blocking_reader(storage, asyncio.get_running_loop()),
        workers=1,
        max_input_pixels=10**7,
    )
    request = TaskRequest(
        task_type=TaskType.IMAGE_ADJUSTER,
        params={"base_image": f"artifact:{blob.sha256}", "brightness": 0.2, "seed": 1},
        idempotency_key="reads-2",
        organization="default",
    )
    await backend.submit(request)
    await asyncio.wait_for(storage.reading.wait(), 10)  # the worker waits on the loop now
    closing = asyncio.create_task(backend.aclose())
    for _ in range(20):  # let the close reach its wait for the worker threads
        await asyncio.sleep(0)
    storage.release.set()  # only a loop that is not blocked gets here
    await asyncio.wait_for(closing, 10)
