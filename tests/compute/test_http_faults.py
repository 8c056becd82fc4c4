"""The engine over the HTTP adapter against a faulty compute server.

A fault-injecting proxy (a real socket) sits between the adapter and the project's
compute server in its own process. Every test checks that each generation ends in the
right terminal state and that the compute server created exactly one task per
prediction attempt, whatever was refused, failed, dropped, slowed or delivered twice.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import make_settings
from faultproxy import Fault, FaultProxy
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    CatalogStub,
    GenerationStub,
    assert_eventually,
    create_product,
    generate_request,
    png_bytes,
    wait_terminal,
)
from procs import ServerProcess

from sartiq_grpc.sartiq.generation.v1 import enums_pb2
from server.app import App
from server.config import ComputeSettings
from server.domain.enums import Strategy
from server.domain.model import Expectations
from server.evaluation.base import EvaluationError, EvaluationInput
from server.evaluation.remote import RemoteEvaluator

COMPLETED = enums_pb2.GENERATION_STATUS_COMPLETED
TOKEN = "fault-test-token"


@dataclass
class Rig:
    compute: ServerProcess
    proxy: FaultProxy
    app: App
    stub: GenerationStub
    channel: grpc.aio.Channel
    product_id: str

    async def tasks_created(self) -> int:
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"{self.compute.url}/health")
        created: int = answer.json()["tasks_created"]
        return created

    async def generate(self, batch: int = 1) -> str:
        created = await self.stub.CreateGenerateGeneration(
            generate_request(self.product_id, batch=batch)
        )
        return created.generation.id

    async def compute_serving(self) -> bool:
        """Whether the health service reports the compute backend SERVING."""
        check = health_pb2_grpc.HealthStub(self.channel).Check
        answer = await check(health_pb2.HealthCheckRequest(service="sartiq.compute"))
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
async def rig(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    """The service over a proxy to a compute server; ``push`` unless the test says False."""
    push: bool = getattr(request, "param", True)
    compute = ServerProcess.compute_server(tmp_path, token=TOKEN)
    await compute.start()
    proxy = FaultProxy(compute.port)
    await proxy.start()
    settings = make_settings(tmp_path).model_copy(
        update={
            "compute": ComputeSettings(
                backend="http",
                url=proxy.url,
                token=TOKEN,
                timeout=1.0,
                retry_budget=30.0,
                breaker_min_calls=3,
                breaker_reset=0.3,
                push=push,
            )
        }
    )
    app = App(settings)
    try:
        await app.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        product_id = await create_product(CatalogStub(channel), "Dress")
        yield Rig(compute, proxy, app, GenerationStub(channel), channel, product_id)
        await channel.close(None)
    finally:
        await app.shutdown()
        await proxy.close()
        await compute.stop()


async def _completed(rig: Rig, generation_id: str) -> None:
    done = await wait_terminal(rig.stub, generation_id, timeout=60)
    assert done.status == COMPLETED, [p.error.message for p in done.predictions]


async def test_refused_connections_then_recovery(rig: Rig) -> None:
    await rig.proxy.refuse()
    generation_id = await rig.generate()

    async def tried() -> bool:
        return not await rig.compute_serving()

    await assert_eventually(tried, timeout=20)  # the circuit opened; the work waits
    await rig.proxy.accept()
    await _completed(rig, generation_id)
    assert await rig.tasks_created() == 1

    await assert_eventually(rig.compute_serving)


async def test_server_errors_are_retried(rig: Rig) -> None:
    rig.proxy.faults = [
        Fault.error(500, "POST"),
        Fault.error(502, "POST"),
        Fault.error(503, "GET"),
        Fault.error(502, "GET"),
    ]
    generation_id = await rig.generate()
    await _completed(rig, generation_id)
    assert await rig.tasks_created() == 1
    assert not rig.proxy.faults  # every fault was met


async def test_an_answer_lost_after_the_server_accepted_does_not_start_a_second_task(
    rig: Rig,
) -> None:
    rig.proxy.faults = [Fault.drop("POST"), Fault.hang(2.0, "POST")]
    generation_id = await rig.generate()
    await _completed(rig, generation_id)
    posts = [r for r in rig.proxy.requests if r[0] == "POST"]
    assert len(posts) >= 3  # dropped, timed out, then answered
    assert await rig.tasks_created() == 1


async def test_duplicate_deliveries_are_one_task(rig: Rig) -> None:
    rig.proxy.faults = [Fault.twice("POST"), Fault.twice("POST")]
    generation_id = await rig.generate(batch=2)
    await _completed(rig, generation_id)
    assert await rig.tasks_created() == 2  # two predictions, each delivered twice


async def test_slow_answers_and_resets_are_ridden_out(rig: Rig) -> None:
    rig.proxy.faults = [
        Fault.slow(0.5, "GET"),
        Fault.reset("GET"),
        Fault.slow(0.5, "GET"),
        Fault.reset("GET"),
    ]
    generation_id = await rig.generate()
    await _completed(rig, generation_id)
    assert await rig.tasks_created() == 1


def _forgotten(times: int) -> list[Fault]:
    """A server that lost the task: 404 for its events (push) and for the poll after them."""
    return [Fault.forget(call="events", times=times), Fault.forget(call="status", times=times)]


def _events_asked(rig: Rig) -> bool:
    return any(path.endswith("/events") for _, path in rig.proxy.requests)


@pytest.mark.parametrize("rig", [True, False], ids=["push", "poll"], indirect=True)
async def test_a_task_the_server_forgot_is_submitted_again_once(rig: Rig) -> None:
    rig.proxy.faults = _forgotten(1)
    generation_id = await rig.generate()
    done = await wait_terminal(rig.stub, generation_id, timeout=60)
    assert done.status == COMPLETED
    task = done.predictions[0].tasks[0]
    assert task.attempt == 2
    assert len(task.previous_compute_task_ids) == 1
    # The server had not really forgotten it: the same key found the same task again.
    assert await rig.tasks_created() == 1
    assert ("status", "forget") in rig.proxy.injected
    assert _events_asked(rig) is rig.app.settings.compute.push


async def test_a_permanent_error_fails_at_once_with_the_remote_category(rig: Rig) -> None:
    rig.proxy.faults = [Fault.error(400, "POST")]
    generation_id = await rig.generate()
    done = await wait_terminal(rig.stub, generation_id, timeout=30)
    assert done.status == enums_pb2.GENERATION_STATUS_FAILED
    task = done.predictions[0].tasks[0]
    assert task.error.metadata["category"] == "validation"  # what the injected body said
    assert task.error.message == "injected 400"
    assert len([r for r in rig.proxy.requests if r[0] == "POST"]) == 1  # no retry
    assert await rig.tasks_created() == 0


async def test_the_remote_evaluator_sends_the_expectations_and_rides_out_a_503(
    rig: Rig,
) -> None:
    rig.proxy.faults = [Fault.error(503, "POST", "/api/v1/evaluation/")]
    evaluator = RemoteEvaluator(rig.proxy.url, token=TOKEN)
    try:
        evaluation = await evaluator.evaluate(
            EvaluationInput(
                output=png_bytes((30, 90, 160), (64, 64)),
                strategy=Strategy.GENERATE,
                expected_size=(64, 64),
                expectations=Expectations(framing="full body", gender="female"),
            )
        )
    finally:
        await evaluator.aclose()
    assert evaluation.provider == "remote"
    assert evaluation.criteria["size"] == 1.0
    assert 0.0 <= evaluation.score <= 1.0
    sent = json.loads(rig.proxy.bodies[-1])
    assert sent["expectations"]["framing"] == "full body"
    assert sent["expectations"]["gender"] == "female"
    assert sent["image"].startswith("data:image/png;base64,")
    assert len([r for r in rig.proxy.requests if r[1] == "/api/v1/evaluation/"]) == 2


async def test_an_unusable_image_is_an_evaluation_error(rig: Rig) -> None:
    evaluator = RemoteEvaluator(rig.compute.url, token=TOKEN)
    try:
        with pytest.raises(EvaluationError, match="cannot evaluate"):
            await evaluator.evaluate(EvaluationInput(output=b"junk", strategy=Strategy.GENERATE))
    finally:
        await evaluator.aclose()


@pytest.mark.parametrize("rig", [True, False], ids=["push", "poll"], indirect=True)
async def test_a_task_forgotten_twice_fails_instead_of_looping(rig: Rig) -> None:
    rig.proxy.faults = _forgotten(2)
    generation_id = await rig.generate()
    done = await wait_terminal(rig.stub, generation_id, timeout=60)
    assert done.status == enums_pb2.GENERATION_STATUS_FAILED
    task = done.predictions[0].tasks[0]
    assert task.error.metadata["category"] == "not_found"
    assert "lost the task again" in task.error.message
