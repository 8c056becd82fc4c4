"""The HTTP adapter's inputs: ``artifact:`` references read from the service's storage.

Against the project's compute server in its own process, with the service's own
resolver (``blocking_reader``: the read runs on the event loop, the local directory
storage reads on the loop's default threads).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from compute_rig import TOKEN, ComputeProcess, compute_process
from helpers import png_bytes

from server.compute.base import TaskRequest
from server.compute.http import HttpComputeBackend
from server.domain.enums import TaskType
from server.media.artifacts import FileArtifactStore
from server.media.storage import blocking_reader


@pytest.fixture(scope="module")
def compute(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComputeProcess]:
    yield from compute_process(tmp_path_factory.mktemp("inputs-compute"))


async def test_many_submits_at_once_read_their_inputs_without_deadlock(
    tmp_path: Path, compute: ComputeProcess
) -> None:
    """More concurrent submits than the loop's default threads: each still reads its input.

    Resolving on those same threads, every one of them waited for a storage read that
    needed one of them: nothing was ever submitted.
    """
    storage = FileArtifactStore(tmp_path / "artifacts")
    await storage.start()
    blob = await storage.put(png_bytes((40, 80, 120), (64, 64)), "image/png")
    loop = asyncio.get_running_loop()
    backend = HttpComputeBackend(compute.url, resolve=blocking_reader(storage, loop), token=TOKEN)
    many = 2 * min(32, (os.cpu_count() or 1) + 4)  # twice the loop's default threads

    def request(n: int) -> TaskRequest:
        return TaskRequest(
            task_type=TaskType.IMAGE_ADJUSTER,
            params={"base_image": f"artifact:{blob.sha256}", "brightness": 0.1, "seed": n},
            idempotency_key=f"inputs-{n}",
            organization="default",
        )

    try:
        async with asyncio.timeout(30):
            ids = await asyncio.gather(*(backend.submit(request(n)) for n in range(many)))
            assert len(set(ids)) == many
            await asyncio.gather(*(backend.cancel(compute_id) for compute_id in ids))
    finally:
        await backend.aclose()
        await storage.aclose()
