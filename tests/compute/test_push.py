"""Task status pushed on the events stream, polling as the fallback.

The project's compute server in its own processes (embedded, and the fleet: two API
servers over Redis, two Celery workers), a fault proxy in front of it, and the service
over the HTTP adapter with a real gRPC client (``compute_rig``); the adapter alone where
what it yields is the point. A task followed on its stream costs one events request
and no status poll; every fault on the events call (refused, reset, 5xx, 404, an older
server's 405 and 501, a stream cut mid-event, a flipped bit, a stream gone silent past
the read timeout, the wrong content type, a body that is no stream, an event that does
not parse) falls back to polling within the same watch: still one events request, then
polls, and the generation completes with verified outputs.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from compute_rig import COMPLETED, MODES, TOKEN, ComputeProcess, Rig, compute_process, rig
from faultproxy import NO_FIELDS, NOT_OBJECTS, Fault, FaultProxy, call_of
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import assert_eventually, png_bytes

from sartiq_grpc.sartiq.generation.v1 import enums_pb2
from server.compute.base import TaskRequest
from server.compute.http import HttpComputeBackend
from server.compute.wire import EVENTS_KEEPALIVE_S, ErrorBody, HealthAnswer, parse
from server.domain.enums import TaskStatus, TaskType

FAILED = enums_pb2.GENERATION_STATUS_FAILED
RANK = {TaskStatus.PENDING: 0, TaskStatus.RUNNING: 1, TaskStatus.COMPLETED: 2}
# Per call: no call times out on a busy machine, so one events request per task means
# that nothing made the service follow the task again (the hang fault still outlasts the
# stream's read timeout, 3 x EVENTS_KEEPALIVE_S).
TIMEOUT = 5.0


@pytest.fixture(scope="module", params=MODES)
def compute(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComputeProcess]:
    yield from compute_process(tmp_path_factory.mktemp("push-compute"), request.param)


def _requests(r: Rig, call: str, compute_id: str) -> int:
    """How many requests of ``call`` about task ``compute_id`` went through the proxy."""
    return sum(
        1
        for method, path in r.proxy.requests
        if call_of(method, path) == call and f"/{compute_id}" in path
    )


async def _completed(r: Rig, generation_id: str, tmp_path: Path) -> str:
    """The generation COMPLETED with its output verified; its task's compute id."""
    generation = await r.terminal(generation_id, timeout=60)
    assert generation.status == COMPLETED, [p.error.message for p in generation.predictions]
    assert await r.check_outputs(generation, tmp_path) == 1
    task = generation.predictions[0].tasks[-1]
    assert task.attempt == 1  # followed to its end: never lost, never submitted again
    return str(task.compute_task_id)


async def _event_streams(compute: ComputeProcess) -> int:
    """The events streams open on every API server of the compute server."""
    async with httpx.AsyncClient() as http:
        answers = [await http.get(f"http://127.0.0.1:{port}/health") for port in compute.ports]
    return sum(parse(HealthAnswer, answer.content).event_streams for answer in answers)


async def _streams_closed(r: Rig) -> None:
    async def closed() -> bool:
        return await _event_streams(r.compute) == 0

    await assert_eventually(closed, timeout=15, interval=0.05)


async def test_a_task_is_followed_on_its_events_stream_without_polling(
    tmp_path: Path, compute: ComputeProcess
) -> None:
    async with rig(tmp_path, compute, timeout=TIMEOUT) as r:
        compute_id = await _completed(r, await r.video(seconds=2, fps=12), tmp_path)
        assert _requests(r, "events", compute_id) == 1
        assert _requests(r, "status", compute_id) == 0
        await r.nothing_left_running()
        await _streams_closed(r)


async def test_progress_is_pushed_as_it_happens(tmp_path: Path, compute: ComputeProcess) -> None:
    """A long task's progress reaches the service while it runs, with no status poll."""
    async with rig(tmp_path, compute, timeout=TIMEOUT) as r:
        generation_id = await r.video(seconds=30, fps=60)
        await assert_eventually(lambda: r.running(generation_id), timeout=30)
        task = (await r.client.get(generation_id)).predictions[0].tasks[0]
        assert (await r.remote_task(task.compute_task_id)).status == "running"
        assert _requests(r, "events", task.compute_task_id) == 1
        assert _requests(r, "status", task.compute_task_id) == 0
        await r.client.cancel(generation_id)
        await r.nothing_left_running()
        await _streams_closed(r)


async def test_with_push_off_the_service_polls_only(
    tmp_path: Path, compute: ComputeProcess
) -> None:
    async with rig(tmp_path, compute, push=False) as r:
        compute_id = await _completed(r, await r.video(seconds=1, fps=12), tmp_path)
        assert _requests(r, "events", compute_id) == 0
        assert _requests(r, "status", compute_id) >= 1


EVENT_FAULTS = [
    Fault.reset(call="events"),
    Fault.drop(call="events"),
    Fault.error(500, call="events"),
    Fault.error(502, call="events"),
    Fault.error(503, call="events"),
    Fault.forget(call="events"),
    Fault.error(405, call="events"),
    Fault.error(501, call="events"),
    Fault.truncate(call="events"),
    Fault.bitflip(call="events"),
    Fault.hang(30.0, call="events"),
    Fault.twice(call="events"),
    Fault.content_type("text/html", call="events"),
    Fault.content_type("application/json", call="events"),
    *(Fault.answer(payload, call="events") for payload in NOT_OBJECTS + NO_FIELDS),
    Fault.answer(b"<html>Bad Gateway</html>", call="events", content="text/event-stream"),
]


def _name(fault: Fault) -> str:
    if fault.kind in ("answer", "content_type"):
        return f"{fault.kind}-{fault.payload.decode()[:20] or fault.content}"
    return f"{fault.kind}-{fault.status}" if fault.status else fault.kind


@pytest.mark.parametrize("fault", EVENT_FAULTS, ids=_name)
async def test_a_fault_on_the_events_call_falls_back_to_polling(
    fault: Fault, tmp_path: Path, compute: ComputeProcess
) -> None:
    async with rig(tmp_path, compute, timeout=TIMEOUT) as r:
        r.proxy.faults = [fault]
        compute_id = await _completed(r, await r.video(seconds=2, fps=12), tmp_path)
        assert ("events", fault.kind) in r.proxy.injected
        # One stream asked for: the fault never escaped the watch (a watch that failed
        # would be followed again, asking for the stream again).
        assert _requests(r, "events", compute_id) == 1
        if fault.kind != "bitflip":  # a flipped bit may land where it harms nothing
            assert _requests(r, "status", compute_id) >= 1
        await r.nothing_left_running()
        await _streams_closed(r)


def _set(**fields: object) -> Callable[[bytes], bytes | None]:
    """A rewrite setting top-level fields of a task event's data."""

    def change(body: bytes) -> bytes | None:
        return json.dumps(json.loads(body) | fields).encode()

    return change


def _completed_without_outputs(body: bytes) -> bytes | None:
    answer = json.loads(body)
    if answer["status"] != "completed":
        return None  # not this event: the next one
    answer["output"] = {"images": [], "videos": []}
    return json.dumps(answer).encode()


def _replace(payload: bytes) -> Callable[[bytes], bytes | None]:
    def change(body: bytes) -> bytes | None:
        return payload

    return change


MALFORMED_EVENTS = [
    Fault.rewrite(_set(status="paused"), call="events"),
    Fault.rewrite(_set(progress=1.5), call="events"),
    Fault.rewrite(_set(id="local-another"), call="events"),
    Fault.rewrite(_set(progress="0.5"), call="events"),
    Fault.rewrite(_completed_without_outputs, call="events"),
    Fault.rewrite(_replace(b"null"), call="events"),
    Fault.rewrite(_replace(b'{"status": "completed"'), call="events"),
    Fault.rewrite(_set(status="paused"), call="events", times=None),
]


@pytest.mark.parametrize(
    "fault",
    MALFORMED_EVENTS,
    ids=[
        "unknown-status",
        "progress-out-of-range",
        "another-task",
        "progress-a-string",
        "completed-without-outputs",
        "null",
        "cut-json",
        "every-event-of-every-stream",
    ],
)
async def test_a_malformed_event_is_only_ever_a_fallback(
    fault: Fault, tmp_path: Path, compute: ComputeProcess
) -> None:
    async with rig(tmp_path, compute, timeout=TIMEOUT) as r:
        r.proxy.faults = [fault]
        compute_id = await _completed(r, await r.video(seconds=2, fps=12), tmp_path)
        assert ("events", "rewrite") in r.proxy.injected
        assert _requests(r, "events", compute_id) == 1
        assert _requests(r, "status", compute_id) >= 1
        await r.nothing_left_running()


def _first_output(**fields: object) -> Callable[[bytes], bytes | None]:
    """A rewrite of the completed event's first output (the other events pass)."""

    def change(body: bytes) -> bytes | None:
        answer = json.loads(body)
        if answer["status"] != "completed":
            return None
        (answer["output"]["images"] + answer["output"]["videos"])[0].update(fields)
        return json.dumps(answer).encode()

    return change


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_first_output(url="/health"), ("malformed answer", "not one of the task's output paths")),
        (_first_output(size=10), ("failed verification", "more than the 10 bytes announced")),
        (_first_output(sha256="0" * 64), ("failed verification", "SHA-256")),
    ],
    ids=["elsewhere", "longer-than-announced", "another-hash"],
)
async def test_a_pushed_completion_is_verified_as_a_polled_one(
    change: Callable[[bytes], bytes | None],
    words: tuple[str, ...],
    tmp_path: Path,
    compute: ComputeProcess,
) -> None:
    """Outputs a completed event names are downloaded and checked: a lie fails the task."""
    async with rig(tmp_path, compute, retry_budget=1.5) as r:
        r.proxy.faults = [Fault.rewrite(change, call="events", times=None)]
        generation = await r.terminal(await r.generate(), timeout=30)
        assert generation.status == FAILED
        (prediction,) = generation.predictions
        assert not prediction.artifact.sha256
        message = prediction.tasks[0].error.message
        for word in words:
            assert word in message, message
        await r.nothing_left_running()


async def test_events_failing_open_their_circuit_and_the_service_polls_at_once(
    tmp_path: Path, compute: ComputeProcess
) -> None:
    """Three failed streams open the events circuit; the service stays SERVING and polls.

    Each kind of failure counts: an error answer, no answer, an event that does not parse.
    """
    async with rig(
        tmp_path,
        compute,
        breaker_min_calls=3,
        breaker_failure_rate=1.0,  # all three must count as failures
        breaker_reset=600.0,
    ) as r:
        r.proxy.faults = [
            Fault.error(503, call="events"),
            Fault.reset(call="events"),
            Fault.rewrite(_set(status="paused"), call="events"),
        ]
        ids = [await _completed(r, await r.generate(), tmp_path) for _ in range(5)]
        asked = [_requests(r, "events", compute_id) for compute_id in ids]
        assert asked == [1, 1, 1, 0, 0]
        assert all(_requests(r, "status", compute_id) >= 1 for compute_id in ids)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{r.app.port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            answer = await check(health_pb2.HealthCheckRequest(service="sartiq.compute"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_stream_of_an_unknown_task_is_a_404_and_it_needs_the_token(
    compute: ComputeProcess,
) -> None:
    async with httpx.AsyncClient(base_url=compute.url) as http:
        refused = await http.get("/api/v1/tasks/local-nothing/events")
        assert refused.status_code == 401
        headers = {"authorization": f"Bearer {TOKEN}"}
        unknown = await http.get("/api/v1/tasks/local-nothing/events", headers=headers)
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/json"
    assert parse(ErrorBody, unknown.content).error_category == "not_found"


async def test_a_stream_shows_life_and_ends_when_its_client_leaves(
    tmp_path: Path, compute: ComputeProcess
) -> None:
    """Numbered task events and keep-alives; a client gone closes the server's stream."""
    async with rig(tmp_path, compute, push=False) as r:
        generation_id = await r.video(seconds=30, fps=60)
        await assert_eventually(lambda: r.running(generation_id), timeout=30)
        compute_id = (await r.client.get(generation_id)).predictions[0].tasks[0].compute_task_id
        headers = {"authorization": f"Bearer {TOKEN}"}
        lines: list[str] = []
        async with (
            httpx.AsyncClient(base_url=compute.url, headers=headers) as http,
            http.stream("GET", f"/api/v1/tasks/{compute_id}/events") as stream,
        ):
            assert stream.headers["content-type"].startswith("text/event-stream")
            # Held, not left to the loop: a broken-off async for leaves its generator to
            # be closed whenever it is collected, and closing it closes the response.
            received = stream.aiter_lines()
            async with asyncio.timeout(3 * EVENTS_KEEPALIVE_S):
                async for line in received:
                    lines.append(line)
                    if line == ": keep-alive":
                        break
            assert await _event_streams(compute) == 1
        numbers = [int(line[4:]) for line in lines if line.startswith("id: ")]
        assert numbers == list(range(1, len(numbers) + 1))
        assert [line for line in lines if line.startswith("event: ")] == ["event: task"] * len(
            numbers
        )
        await _streams_closed(r)  # the client left: the stream stopped
        assert (await r.remote_task(compute_id)).status == "running"  # the task did not
        await r.client.cancel(generation_id)
        await r.nothing_left_running()


def _request(seconds: float) -> TaskRequest:
    return TaskRequest(
        task_type=TaskType.VIDEO_GENERATION,
        params={"base_image": "artifact:still", "fps": 24, "duration_s": seconds, "seed": 3},
        idempotency_key=f"push-video-{uuid.uuid4()}",
        organization="default",
    )


async def test_a_watch_that_falls_back_never_repeats_a_state_nor_goes_back(
    compute: ComputeProcess,
) -> None:
    """The stream turns malformed mid-task; stale and older status answers are skipped."""
    passed: dict[str, Any] = {}
    events_passed: list[bytes] = []

    def events(body: bytes) -> bytes | None:
        if len(events_passed) == 2:
            return b'{"status": "paused"}'  # malformed from the third event: fall back
        events_passed.append(body)
        answer = json.loads(body)
        passed.update(status=answer["status"], progress=answer["progress"])
        return None

    def stale(body: bytes) -> bytes | None:  # the very state the stream showed last
        return json.dumps(json.loads(body) | passed).encode()

    def behind(body: bytes) -> bytes | None:
        return json.dumps(json.loads(body) | {"progress": passed["progress"] / 2}).encode()

    proxy = FaultProxy(compute.port, also=compute.ports[1:])
    await proxy.start()
    proxy.faults = [
        Fault.rewrite(events, call="events"),
        Fault.rewrite(stale, call="status"),
        Fault.rewrite(behind, call="status"),
        Fault.rewrite(_set(status="pending", progress=0.0), call="status"),
    ]
    backend = HttpComputeBackend(
        proxy.url, resolve=lambda _: png_bytes((90, 30, 200), (512, 512)), token=TOKEN
    )
    try:
        compute_id = await backend.submit(_request(6.0))
        states = [
            (snapshot.status, snapshot.progress, len(snapshot.outputs))
            async for snapshot in backend.watch(compute_id)
        ]
    finally:
        await backend.aclose()
        await proxy.close()
    assert proxy.injected == [("events", "rewrite")] + [("status", "rewrite")] * 3, states
    ranks = [(RANK[status], progress) for status, progress, _ in states]
    assert ranks == sorted(set(ranks)), states  # each one ahead of the one before
    assert (passed["status"], passed["progress"]) in [(s.lower(), p) for s, p, _ in states]
    assert states[-1][0] is TaskStatus.COMPLETED
    assert states[-1][2] == 1
