"""A third of every wire call faulted at random must not stop new work.

The fault proxy faults 30% of the requests of every call (submit, status, output
downloads, cancels, lookups) with a random fault: refused or reset connections, 5xx,
answers lost after the server acted, JSON that is not an object or lacks its fields,
truncated and bit-flipped bodies, the wrong content type, HTML instead of an image. With
the default breaker settings, every generation completes, every stored output is the
one the compute server produced, no task leaks or runs twice, and no circuit opens.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from compute_rig import COMPLETED, MODES, ComputeProcess, Rig, compute_process, rig
from grpc_health.v1 import health_pb2, health_pb2_grpc

GENERATIONS = 20
BATCH = 2


@pytest.fixture(scope="module", params=MODES)
def compute(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComputeProcess]:
    yield from compute_process(tmp_path_factory.mktemp("partial-faults-compute"), request.param)


async def _watch_compute_health(r: Rig, seen: list[int]) -> None:
    """Record every status the health service reports for ``sartiq.compute``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{r.app.port}") as channel:
        request = health_pb2.HealthCheckRequest(service="sartiq.compute")
        async for answer in health_pb2_grpc.HealthStub(channel).Watch(request):
            seen.append(answer.status)


@pytest.mark.timeout(180)
async def test_thirty_percent_random_faults_do_not_stop_new_work(
    tmp_path: Path, compute: ComputeProcess
) -> None:
    async with rig(tmp_path, compute, retry_budget=60.0) as r:
        health: list[int] = []
        watcher = asyncio.create_task(_watch_compute_health(r, health))
        try:
            before = await r.health()
            r.proxy.chaos(0.3, seed=5)
            ids = [await r.generate(batch=BATCH) for _ in range(GENERATIONS)]
            done = [await r.terminal(generation_id, timeout=120) for generation_id in ids]
            r.proxy.chaos(0.0, seed=0)
            for generation in done:
                assert generation.status == COMPLETED, [
                    p.error.message for p in generation.predictions
                ]
            checked = [await r.check_outputs(generation, tmp_path) for generation in done]
            assert sum(checked) == GENERATIONS * BATCH
            after = await r.nothing_left_running()
            assert after.tasks_created - before.tasks_created == GENERATIONS * BATCH
        finally:
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher
        kinds = Counter(kind for _, kind in r.proxy.injected)
        calls = Counter(call for call, _ in r.proxy.injected)
        assert {"truncate", "bitflip", "answer", "content_type", "error", "reset"} <= set(kinds)
        assert {"submit", "events", "status", "output"} <= set(calls)
        faulted = len(r.proxy.injected) / len(r.proxy.requests)
        assert 0.25 <= faulted <= 0.4, faulted  # 30% drawn per request
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health
        assert set(health) == {serving}, "a circuit opened"
