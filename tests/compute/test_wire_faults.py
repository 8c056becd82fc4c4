"""Every call of the wire protocol, answered with nonsense, through a fault proxy.

JSON that is not an object, objects without their fields, truncated and bit-flipped
bodies, the wrong content type, outputs that are not images, and malformed cancel
answers. Every test checks that each generation ends terminal within a bound, that no
corrupt output is ever COMPLETED (every stored output is downloaded, hashed, decoded and
compared with what the compute server produced), and that the compute server ends with
nothing pending or running and every task it created ended: nothing leaked.

The faults on status answers are met with push off (the service then polls each task's
status); those on the events stream, which polling replaces, are in ``test_push``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from compute_rig import COMPLETED, MODES, TOKEN, ComputeProcess, Rig, compute_process, rig
from faultproxy import NO_FIELDS, NOT_OBJECTS, Fault, FaultProxy
from helpers import assert_eventually, png_bytes

from sartiq_grpc.sartiq.generation.v1 import enums_pb2
from server.compute.retry import RetryPolicy
from server.domain.enums import Strategy
from server.evaluation.base import EvaluationError, EvaluationInput
from server.evaluation.remote import RemoteEvaluator

FAILED = enums_pb2.GENERATION_STATUS_FAILED
CANCELLED = enums_pb2.GENERATION_STATUS_CANCELLED
NOT_AN_IMAGE = b"<html><body>502 from some cache</body></html>"


@pytest.fixture(scope="module", params=MODES)
def compute(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ComputeProcess]:
    yield from compute_process(tmp_path_factory.mktemp("wire-faults-compute"), request.param)


def _status(value: str) -> Callable[[bytes], bytes | None]:
    """A rewrite giving the status answer an unknown status."""

    def unknown_status(body: bytes) -> bytes | None:
        answer = json.loads(body)
        answer["status"] = value
        return json.dumps(answer).encode()

    return unknown_status


def _announce(data: bytes, *, kind: str = "") -> Callable[[bytes], bytes | None]:
    """A rewrite of a completed status answer naming ``data`` (sha256, size) as its output."""

    def change(body: bytes) -> bytes | None:
        answer = json.loads(body)
        if answer["status"] != "completed":
            return None  # not this answer: the fault waits for the completed one
        items = answer["output"]["images"] + answer["output"]["videos"]
        item = items[0] | {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        if kind:
            answer["output"] = {"images": [], "videos": []} | {kind: [item]}
        else:
            items[0].update(item)
        return json.dumps(answer).encode()

    return change


def _set(**fields: object) -> Callable[[bytes], bytes | None]:
    """A rewrite setting top-level fields of a JSON answer."""

    def change(body: bytes) -> bytes | None:
        return json.dumps(json.loads(body) | fields).encode()

    return change


def _completed(change: Callable[[dict[str, Any]], None]) -> Callable[[bytes], bytes | None]:
    """A rewrite of completed status answers only (the others pass untouched)."""

    def rewrite(body: bytes) -> bytes | None:
        answer = json.loads(body)
        if answer["status"] != "completed":
            return None
        change(answer)
        return json.dumps(answer).encode()

    return rewrite


def _first_output(**fields: object) -> Callable[[dict[str, Any]], None]:
    def change(answer: dict[str, Any]) -> None:
        answer["output"]["images"][0].update(fields)

    return change


def _no_outputs(answer: dict[str, Any]) -> None:
    answer["output"] = {"images": [], "videos": []}


def _swap_image(body: bytes) -> bytes | None:
    """Another valid PNG, padded to the output's size: only its hash tells it apart."""
    other = png_bytes((0, 0, 255), (16, 16))
    return other + bytes(len(body) - len(other))


def _mangled(call: str) -> list[Fault]:
    return [
        *(Fault.answer(payload, call=call) for payload in NOT_OBJECTS + NO_FIELDS),
        Fault.truncate(call=call),
        Fault.bitflip(call=call),
        Fault.content_type("text/html", call=call),
    ]


ONCE = [
    *_mangled("submit"),
    *_mangled("status"),
    Fault.rewrite(_status("paused"), call="status"),
    Fault.truncate(call="output"),
    Fault.bitflip(call="output"),
    Fault.answer(NOT_AN_IMAGE, call="output", content="image/png"),
    Fault.content_type("text/plain", call="output"),
    Fault.rewrite(_swap_image, call="output"),
    Fault.drop(call="submit"),
]


def _polls(*faults: Fault) -> bool:
    """Push unless a fault is on the status answers, which only a polling service reads."""
    return not any(fault.call == "status" for fault in faults)


def _name(fault: Fault) -> str:
    if fault.change is not None:
        return f"{fault.call}-{fault.kind}-{fault.change.__name__}"
    payload = fault.payload.decode()[:20] if fault.payload else fault.content
    return f"{fault.call}-{fault.kind}-{payload}"


async def _one(rig: Rig, tmp_path: Path) -> None:
    """One generation COMPLETED, its output intact, one task created, nothing left."""
    before = await rig.health()
    generation = await rig.terminal(await rig.generate())
    assert generation.status == COMPLETED, [p.error.message for p in generation.predictions]
    assert await rig.check_outputs(generation, tmp_path) == 1
    after = await rig.nothing_left_running()
    assert after.tasks_created - before.tasks_created == 1


@pytest.mark.parametrize("fault", ONCE, ids=_name)
async def test_a_mangled_answer_is_retried_and_nothing_corrupt_is_kept(
    fault: Fault, tmp_path: Path, compute: ComputeProcess
) -> None:
    async with rig(tmp_path, compute, push=_polls(fault)) as r:
        r.proxy.faults = [fault]
        await _one(r, tmp_path)
        assert (fault.call, fault.kind) in r.proxy.injected


async def test_an_output_its_server_lies_about_is_not_stored(
    tmp_path: Path, compute: ComputeProcess
) -> None:
    """The status names junk with the junk's own hash and size: only decoding catches it."""
    async with rig(tmp_path, compute, push=False) as r:
        r.proxy.faults = [
            Fault.rewrite(_announce(NOT_AN_IMAGE), call="status"),
            Fault.answer(NOT_AN_IMAGE, call="output", content="image/png"),
        ]
        await _one(r, tmp_path)
        assert ("output", "answer") in r.proxy.injected


async def _failed(r: Rig, generation_id: str, *words: str) -> None:
    generation = await r.terminal(generation_id)
    assert generation.status == FAILED
    (prediction,) = generation.predictions
    assert not prediction.artifact.sha256
    task = prediction.tasks[0]
    for word in words:
        assert word in task.error.message, task.error.message
    await r.nothing_left_running()


@pytest.mark.parametrize(
    ("faults", "words"),
    [
        ([Fault.answer(b"null", call="status", times=None)], ("malformed answer", "object")),
        ([Fault.truncate(call="output", times=None)], ("failed verification", "bytes where")),
        ([Fault.bitflip(call="output", times=None)], ("failed verification",)),
        (
            [
                Fault.rewrite(_announce(NOT_AN_IMAGE), call="status", times=None),
                Fault.answer(NOT_AN_IMAGE, call="output", content="image/png", times=None),
            ],
            ("failed verification", "not a decodable image"),
        ),
        (
            [Fault.rewrite(_swap_image, call="output", times=None)],
            ("failed verification", "SHA-256 is not the one announced"),
        ),
        (
            [Fault.content_type("text/html", call="status", times=None)],
            ("malformed answer", "content type 'text/html'"),
        ),
        (
            [Fault.rewrite(_set(id="local-another"), call="status", times=None)],
            ("malformed answer", "answered another"),
        ),
        (
            [Fault.rewrite(_completed(_no_outputs), call="status", times=None)],
            ("malformed answer", "at least one output"),
        ),
        (
            [Fault.rewrite(_completed(_first_output(size=10)), call="status", times=None)],
            ("failed verification", "more than the 10 bytes announced"),
        ),
        (
            [Fault.rewrite(_completed(_first_output(url="/health")), call="status", times=None)],
            ("malformed answer", "not one of the task's output paths"),
        ),
        (
            [Fault.rewrite(_set(idempotency_key="another"), call="submit", times=None)],
            ("malformed answer", "another idempotency key"),
        ),
    ],
    ids=[
        "status-null",
        "output-truncated",
        "output-bitflip",
        "output-lie",
        "output-other-image",
        "status-content-type",
        "status-other-task",
        "completed-without-outputs",
        "output-longer-than-announced",
        "output-elsewhere",
        "submit-other-key",
    ],
)
async def test_a_read_that_stays_mangled_fails_the_task_with_the_reason(
    faults: list[Fault], words: tuple[str, ...], tmp_path: Path, compute: ComputeProcess
) -> None:
    async with rig(tmp_path, compute, retry_budget=1.5, push=_polls(*faults)) as r:
        r.proxy.faults = faults
        await _failed(r, await r.generate(), *words)


LOOKUP_FAULTS = [
    None,
    Fault.answer(b"null", call="lookup"),
    Fault.answer(b'{"tasks": [{"id": "local-x"}]}', call="lookup"),
    Fault.truncate(call="lookup"),
    Fault.content_type("text/html", call="lookup"),
    Fault.error(503, call="lookup"),
]


@pytest.mark.parametrize("lookup", LOOKUP_FAULTS, ids=lambda f: "clean" if f is None else _name(f))
async def test_a_submit_whose_answers_stay_unreadable_releases_the_task_it_created(
    lookup: Fault | None, tmp_path: Path, compute: ComputeProcess
) -> None:
    """Every submit answer is `[]`; the lookup by key finds the task, through a fault too."""
    async with rig(tmp_path, compute, retry_budget=1.5) as r:
        r.proxy.faults = [Fault.answer(b"[]", call="submit", times=None)]
        r.proxy.faults += [] if lookup is None else [lookup]
        before = await r.health()
        generation_id = await r.video()
        await _failed(r, generation_id, "malformed answer")
        task = (await r.client.get(generation_id)).predictions[0].tasks[0]
        assert task.compute_task_id, "the task compute created was found by its key"
        remote = await r.remote_task(task.compute_task_id)
        assert remote.status == "cancelled"  # released, not left to run its 20 s video
        assert ("GET", f"/api/v1/tasks/?idempotency_key={task.id}") in r.proxy.requests
        after = await r.health()
        assert after.tasks_created - before.tasks_created == 1
        if lookup is not None:
            assert ("lookup", lookup.kind) in r.proxy.injected


async def test_a_task_given_up_on_is_released_not_left_running(
    tmp_path: Path, compute: ComputeProcess
) -> None:
    async with rig(tmp_path, compute, retry_budget=1.5, push=False) as r:
        generation_id = await r.video()
        await assert_eventually(lambda: r.running(generation_id), timeout=30)
        r.proxy.faults = [Fault.answer(b"null", call="status", times=None)]
        await _failed(r, generation_id, "malformed answer")
        task = (await r.client.get(generation_id)).predictions[0].tasks[0]
        assert (await r.remote_task(task.compute_task_id)).status == "cancelled"


@pytest.mark.parametrize("push", [True, False], ids=["pushed", "polled"])
async def test_a_video_task_that_returns_an_image_fails(
    push: bool, tmp_path: Path, compute: ComputeProcess
) -> None:
    image = png_bytes((10, 200, 30), (64, 64))
    async with rig(tmp_path, compute, retry_budget=1.5, push=push) as r:
        r.proxy.faults = [
            Fault.rewrite(_announce(image, kind="videos"), call="events" if push else "status"),
            Fault.answer(image, call="output", content="video/mp4"),
        ]
        await _failed(r, await r.video(seconds=1, fps=8), "image/png", "VIDEO_GENERATION")


CANCEL_FAULTS = [
    *(Fault.answer(payload, call="cancel", times=None) for payload in NOT_OBJECTS + NO_FIELDS),
    Fault.truncate(call="cancel", times=None),
    Fault.bitflip(call="cancel", times=None),
    Fault.content_type("text/html", call="cancel", times=None),
    Fault.drop(call="cancel", times=None),
]


@pytest.mark.parametrize("fault", CANCEL_FAULTS, ids=_name)
async def test_a_malformed_cancel_answer_still_ends_the_generation_cancelled(
    fault: Fault, tmp_path: Path, compute: ComputeProcess
) -> None:
    async with rig(tmp_path, compute, retry_budget=1.5) as r:
        generation_id = await r.video()
        await assert_eventually(lambda: r.running(generation_id), timeout=30)
        r.proxy.faults = [fault]
        await r.client.cancel(generation_id)
        generation = await r.terminal(generation_id, timeout=30)
        assert generation.status == CANCELLED
        task = generation.predictions[0].tasks[0]
        assert task.status == enums_pb2.COMPUTE_TASK_STATUS_CANCELLED
        if fault.kind != "bitflip":  # a flipped bit may land where it harms nothing
            assert "compute did not confirm release" in task.error.message
        # The cancels reached the server (only their answers were mangled).
        assert (await r.remote_task(task.compute_task_id)).status == "cancelled"
        await r.nothing_left_running()


async def test_unreadable_status_then_unreadable_cancel_answers_still_end_it(
    tmp_path: Path, compute: ComputeProcess
) -> None:
    """The issue's case: status answers `null`, then a cancel whose answers are `{}`.

    The retry budget (5 s) outlasts the moment between the first `null` and the cancel.
    """
    async with rig(tmp_path, compute, retry_budget=5.0, push=False) as r:
        generation_id = await r.video()
        await assert_eventually(lambda: r.running(generation_id), timeout=30)
        r.proxy.faults = [
            Fault.answer(b"null", call="status", times=None),
            Fault.answer(b"{}", call="cancel", times=None),
        ]
        await assert_eventually(lambda: _seen(r, "status", "answer"), timeout=10)
        await r.client.cancel(generation_id)
        generation = await r.terminal(generation_id, timeout=30)
        assert generation.status == CANCELLED
        assert generation.done
        await r.nothing_left_running()


async def _seen(r: Rig, call: str, kind: str) -> bool:
    return (call, kind) in r.proxy.injected


async def test_faults_spread_over_a_long_task_each_get_a_fresh_retry_budget(
    tmp_path: Path, compute: ComputeProcess
) -> None:
    """The retry budget (1.5 s) runs from a failure; a snapshot since then starts it over."""
    async with rig(tmp_path, compute, retry_budget=1.5, push=False) as r:
        generation_id = await r.video(seconds=20, fps=24)

        def progress(at_least: float) -> Callable[[], Awaitable[bool]]:
            async def reached() -> bool:  # 480 frames take seconds to render
                task = (await r.client.get(generation_id)).predictions[0].tasks[0]
                return task.progress >= at_least

            return reached

        for at_least in (0.15, 0.6):  # seconds apart: the second fault is past the first budget
            await assert_eventually(progress(at_least), timeout=60, interval=0.05)
            r.proxy.faults = [Fault.error(503, call="status")]
        generation = await r.terminal(generation_id, timeout=60)
        assert generation.status == COMPLETED, generation.predictions[0].tasks[0].error.message
        assert r.proxy.injected.count(("status", "error")) == 2
        assert await r.check_outputs(generation, tmp_path) == 1


@pytest.mark.parametrize(
    "payload",
    [*NOT_OBJECTS, b'{"criteria": {}}', b'{"score": 7, "criteria": {}}', b'{"score": 0.5}'],
)
async def test_a_malformed_evaluation_answer_is_retried_then_an_evaluation_error(
    payload: bytes, compute: ComputeProcess
) -> None:
    proxy = FaultProxy(compute.port)
    await proxy.start()
    evaluator = RemoteEvaluator(proxy.url, token=TOKEN, retry=RetryPolicy(budget_s=1.0))
    item = EvaluationInput(output=png_bytes((30, 90, 160), (64, 64)), strategy=Strategy.GENERATE)
    try:
        proxy.faults = [Fault.answer(payload, call="evaluation")]
        evaluation = await evaluator.evaluate(item)  # the second answer is the real one
        assert 0.0 <= evaluation.score <= 1.0
        assert ("evaluation", "answer") in proxy.injected
        proxy.faults = [Fault.answer(payload, call="evaluation", times=None)]
        with pytest.raises(EvaluationError, match="malformed answer"):
            await evaluator.evaluate(item)
    finally:
        await evaluator.aclose()
        await proxy.close()
