"""The compute fleet in real processes: two API servers, Celery workers, real Redis.

Kill -9 a worker mid-task and the task is delivered again, completes once, with one
output; kill -9 an API server and the other answers for its tasks; 500 tasks over two
workers, none lost and none run twice; a pending task cancelled never starts and a running
one stops; a VIDEO task does not delay short tasks on their own queue. Each run of a task
is witnessed by the workers' processors (``runs.log``), independently of the records.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from fleet_rig import AMQP_URL, REDIS_URL, Fleet, fleet, requires_rabbitmq, requires_redis
from helpers import assert_eventually, png_bytes

from server.compute.fleet.records import CREATE, Keys
from server.compute.wire import TaskAnswer

pytestmark = [requires_redis, pytest.mark.timeout(240)]
PNG = png_bytes((200, 30, 40), (32, 32))
SOURCE = f"data:image/png;base64,{base64.b64encode(PNG).decode()}"


def adjust(tag: str, brightness: float = 0.1) -> dict[str, object]:
    return {"base_image": SOURCE, "brightness": brightness, "seed": 1, "test_tag": tag}


def video(tag: str) -> dict[str, object]:
    return {"base_image": SOURCE, "fps": 8, "duration_s": 1, "seed": 1, "test_tag": tag}


async def _output(f: Fleet, task: TaskAnswer, index: int = 0) -> bytes:
    (item,) = task.output.items
    async with f.http(index) as http:
        data = (await http.get(item.url)).content
    assert hashlib.sha256(data).hexdigest() == item.sha256
    assert len(data) == item.size
    return data


async def _running(f: Fleet, task_id: str, tag: str) -> None:
    async def started() -> bool:
        return (await f.task(task_id)).status == "running" and f.runs()[tag] >= 1

    await assert_eventually(started, timeout=60, interval=0.05)


async def test_a_worker_killed_mid_task_leaves_it_to_another_which_completes_it_once(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path) as f:
        first, second = await f.add_worker(), await f.add_worker()
        await f.wait_workers(2)
        task = await f.submit("IMAGE_ADJUSTER", adjust("hold-1"), "k-kill")
        await _running(f, task.id, "hold-1")
        (runner,) = f.runners("hold-1")
        victim = first if runner in first.pids else second
        assert runner in victim.pids
        await victim.kill()
        f.release("hold-1")

        done = await f.terminal(task.id, timeout=90)
        assert done.status == "completed", done
        assert [pid not in victim.pids for pid in f.runners("hold-1")] == [True, True]
        assert f.runs()["hold-1"] == 2  # killed once, run to the end once
        await _output(f, done)
        health = await f.health()
        assert (health.tasks_created, health.tasks_ended) == (1, 1)  # ended once


async def test_a_pool_process_killed_mid_task_is_replaced_and_the_task_runs_again_once(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path) as f:
        worker = await f.add_worker()
        await f.wait_workers(1)
        task = await f.submit("IMAGE_ADJUSTER", adjust("hold-child"), "k-child")
        await _running(f, task.id, "hold-child")
        (child,) = f.runners("hold-child")
        assert child in worker.pids
        assert worker.process is not None
        assert child != worker.process.pid  # a pool process, not the worker's main one
        os.kill(child, signal.SIGKILL)
        # The worker hands the delivery back at once, while the dead process's claim still
        # holds: the new delivery waits the claim out, then runs the task again.
        f.release("hold-child")
        done = await f.terminal(task.id, timeout=60)
        assert done.status == "completed", done
        assert f.runs()["hold-child"] == 2
        assert len(done.output.items) == 1
        health = await f.health()
        assert (health.tasks_created, health.tasks_ended) == (1, 1)


async def test_an_api_server_killed_the_other_answers_for_its_task(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        await f.add_worker()
        await f.wait_workers(1)
        task = await f.submit("IMAGE_ADJUSTER", adjust("hold-api"), "k-api", index=0)
        await f.apis[0].kill()
        assert (await f.task(task.id, index=1)).id == task.id
        again = await f.submit("IMAGE_ADJUSTER", adjust("hold-api"), "k-api", index=1)
        assert again.id == task.id  # the idempotency index is shared
        f.release("hold-api")
        done = await f.terminal_at(task.id, index=1)
        assert done.status == "completed"
        await _output(f, done, index=1)
        assert f.runs()["hold-api"] == 1


async def test_500_tasks_over_two_workers_none_lost_none_run_twice(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        await f.add_worker(), await f.add_worker()
        await f.wait_workers(2)
        limit = asyncio.Semaphore(16)

        async def one(n: int) -> str:
            async with limit:
                task = await f.submit("IMAGE_ADJUSTER", adjust(f"t{n}", n / 1000), f"k{n}", n % 2)
                return task.id

        ids = await asyncio.gather(*(one(n) for n in range(500)))
        assert len(set(ids)) == 500

        async def all_ended() -> bool:
            health = await f.health()
            return health.tasks_ended == 500

        await assert_eventually(all_ended, timeout=180, interval=0.2)
        answers = [await f.task(task_id, n % 2) for n, task_id in enumerate(ids)]
        assert {a.status for a in answers} == {"completed"}
        assert all(len(a.output.items) == 1 for a in answers)
        runs = f.runs()
        assert sorted(runs) == sorted(f"t{n}" for n in range(500))
        assert set(runs.values()) == {1}  # none run twice
        runners = {pid for n in range(500) for pid in f.runners(f"t{n}")}
        assert len(runners) == 2, "both workers took tasks"


async def test_a_cancelled_pending_task_never_starts_and_a_running_one_stops(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path) as f:
        await f.add_worker()
        await f.wait_workers(1)
        running = await f.submit("IMAGE_ADJUSTER", adjust("hold-run"), "k-run")
        await _running(f, running.id, "hold-run")
        pending = await f.submit("IMAGE_ADJUSTER", adjust("hold-pending"), "k-pending")
        async with f.http(1) as http:
            cancelled = TaskAnswer.model_validate_json(
                (await http.post(f"/api/v1/tasks/{pending.id}/cancel")).content
            )
            assert cancelled.status == "cancelled"
            stopped = TaskAnswer.model_validate_json(
                (await http.post(f"/api/v1/tasks/{running.id}/cancel")).content
            )
        assert stopped.status == "cancelled"  # stopped between two steps, never released
        # The worker is free again, and the cancelled pending task's delivery is skipped.
        after = await f.submit("IMAGE_ADJUSTER", adjust("after"), "k-after")
        assert (await f.terminal(after.id)).status == "completed"
        assert f.runs()["hold-pending"] == 0
        assert (await f.task(pending.id)).status == "cancelled"
        health = await f.health()
        assert (health.capacity.running, health.capacity.waiting) == (0, 0)
        assert (health.tasks_created, health.tasks_ended) == (3, 3)


async def test_videos_do_not_delay_short_tasks_on_their_own_queue(tmp_path: Path) -> None:
    async with fleet(tmp_path) as f:
        await f.add_worker("--task-types=VIDEO_GENERATION")
        short_types = "IMAGE_ADJUSTER,REFINE,GENERATION,EDITING,BACKGROUND_FIX,FACE_ENHANCER"
        await f.add_worker(f"--task-types={short_types},DETAIL_ENHANCER")
        await f.wait_workers(2)
        videos = [
            await f.submit("VIDEO_GENERATION", video(f"hold-v{n}"), f"v{n}") for n in range(3)
        ]
        await _running(f, videos[0].id, "hold-v0")
        shorts = [await f.submit("IMAGE_ADJUSTER", adjust(f"s{n}"), f"s{n}") for n in range(5)]
        for short in shorts:
            assert (await f.terminal(short.id)).status == "completed"
        # Every short task ended while the videos were still held.
        assert [(await f.task(v.id)).status for v in videos] == ["running", "pending", "pending"]
        for n in range(3):
            f.release(f"hold-v{n}")
        for v in videos:
            done = await f.terminal(v.id, timeout=120)
            assert done.status == "completed", done
            assert done.output.videos[0].frame_count == 8


@requires_rabbitmq
async def test_the_fleet_over_rabbitmq_redelivers_a_killed_workers_task_at_once(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path, broker=AMQP_URL) as f:
        first, second = await f.add_worker(), await f.add_worker()
        await f.wait_workers(2)
        tasks = [
            await f.submit("IMAGE_ADJUSTER", adjust(f"r{n}"), f"r{n}", n % 2) for n in range(10)
        ]
        held = await f.submit("IMAGE_ADJUSTER", adjust("hold-rabbit"), "k-rabbit")
        await _running(f, held.id, "hold-rabbit")
        (runner,) = f.runners("hold-rabbit")
        victim = first if runner in first.pids else second
        await victim.kill()  # its connection drops: RabbitMQ hands the delivery on
        f.release("hold-rabbit")
        done = await f.terminal(held.id, timeout=60)
        assert done.status == "completed"
        assert f.runs()["hold-rabbit"] == 2
        for task in tasks:
            assert (await f.terminal(task.id)).status == "completed"
        assert all(f.runs()[f"r{n}"] == 1 for n in range(10))


async def test_a_task_whose_api_server_died_before_queueing_it_is_queued_by_another(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path) as f:
        await f.add_worker()
        await f.wait_workers(1)
        first = await f.submit("IMAGE_ADJUSTER", adjust("first"), "first")
        assert (await f.terminal(first.id)).status == "completed"
        # The record as an API server writes it just before it dies: created, never queued
        # (its input stored already: the first task's).
        client = aioredis.Redis.from_url(REDIS_URL)
        keys = Keys(f.namespace)
        task_id = f"task-{uuid.uuid4()}"
        try:
            params_json, inputs = await client.hmget(keys.task(first.id), ["params", "inputs"])
            assert params_json is not None
            assert inputs is not None
            params = dict(json.loads(params_json), test_tag="orphan")
            await client.register_script(CREATE)(
                keys=[keys.key("orphan"), keys.task(task_id), keys.pending, keys.created],
                args=[task_id, "orphan", "IMAGE_ADJUSTER", "", json.dumps(params), inputs],
            )
        finally:
            await client.aclose()
        assert (await f.task(task_id, index=1)).status == "pending"
        # Reading it (as the adapter polls) queues it once it has waited a few seconds.
        done = await f.terminal_at(task_id, index=1, timeout=60)
        assert done.status == "completed", done
        assert f.runs()["orphan"] == 1


async def test_a_task_is_queued_on_its_own_types_queue_alone(tmp_path: Path) -> None:
    async with fleet(tmp_path, apis=1) as f:  # no worker: the deliveries stay queued
        await f.submit("IMAGE_ADJUSTER", adjust("queued-a"), "qa")
        await f.submit("VIDEO_GENERATION", video("queued-v"), "qv")
        client = aioredis.Redis.from_url(REDIS_URL)
        prefix = f.namespace.replace(":", ".")
        try:
            lengths = {
                task_type: await client.llen(f"{prefix}.{task_type.lower()}")
                for task_type in ("IMAGE_ADJUSTER", "VIDEO_GENERATION", "GENERATION", "REFINE")
            }
        finally:
            await client.aclose()
        assert lengths == {"IMAGE_ADJUSTER": 1, "VIDEO_GENERATION": 1, "GENERATION": 0, "REFINE": 0}
