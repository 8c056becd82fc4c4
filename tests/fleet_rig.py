"""The compute fleet in real processes: API servers and Celery workers over real Redis.

``SARTIQ_TEST_REDIS_URL`` names the Redis (broker, records and events); without it the
fleet tests skip and say why; CI sets it (``.ci/run``). Every fleet gets its own namespace
(keys and queues), so fleets of several tests share one Redis without meeting, and its
keys are deleted afterwards. Workers run ``tests/fleet_processors.py``: the real CPU
processors, each run noted in ``runs.log``, and ``hold...`` tags held until released.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import assert_eventually
from procs import ROOT, ServerProcess

from server.compute.wire import HealthAnswer, TaskAnswer, parse

REDIS_URL = os.environ.get("SARTIQ_TEST_REDIS_URL", "")
requires_redis = pytest.mark.skipif(
    not REDIS_URL, reason="SARTIQ_TEST_REDIS_URL is not set; the compute fleet needs a Redis"
)
AMQP_URL = os.environ.get("SARTIQ_TEST_AMQP_URL", "")
requires_rabbitmq = pytest.mark.skipif(
    not (AMQP_URL and REDIS_URL),
    reason="SARTIQ_TEST_AMQP_URL (a RabbitMQ) and SARTIQ_TEST_REDIS_URL (the records) are "
    "needed for a fleet over RabbitMQ",
)
TOKEN = "fleet-token"
# Short enough for tests to see a dead worker's task run again within seconds.
LEASE_S = "2"
REDELIVER_AFTER_S = "3"


def _fleet_env(directory: Path, namespace: str, broker: str = "") -> dict[str, str]:
    """The environment of a test fleet's processes (API servers and workers alike)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARTIQ_")}
    settings = {
        "BROKER_URL": broker or REDIS_URL,
        "RECORDS_URL": REDIS_URL,
        "STORAGE__URL": f"file://{directory / 'storage'}",
        "NAMESPACE": namespace,
        "TOKEN": TOKEN,
        "LEASE_S": LEASE_S,
        "REDELIVER_AFTER_S": REDELIVER_AFTER_S,
        "PROCESSORS": "fleet_processors:registry",
        "LOG_LEVEL": "INFO",
    }
    env.update({f"SARTIQ_COMPUTE_SERVER__{k}": v for k, v in settings.items()})
    env["SARTIQ_TEST_FLEET_DIR"] = str(directory)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    env["PYTHONFAULTHANDLER"] = "1"
    return env


class WorkerProcess:
    """A ``sartiq-compute-worker`` in its own session: SIGKILL takes its whole pool."""

    def __init__(self, directory: Path, env: dict[str, str], name: str, args: list[str]) -> None:
        self.name = name
        self.log_path = directory / f"{name}.log"
        self._env = env
        self._argv = [
            sys.executable,
            "-m",
            "server.compute.fleet.worker",
            f"--name={name}@test",
            *args,
        ]
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self._argv,
                env=self._env,
                cwd=ROOT,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    @property
    def pids(self) -> set[int]:
        """The worker's process and its pool's (the session's members)."""
        if self.process is None:
            return set()
        session = self.process.pid
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getsid(int(entry.name)) == session:
                        found.add(int(entry.name))
                except (ProcessLookupError, PermissionError):
                    continue
        return found

    async def kill(self) -> None:
        """SIGKILL the worker and every process of its pool at once."""
        if self.process is not None and self.process.returncode is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            await self.process.wait()

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL past ``timeout``."""
        if self.process is None or self.process.returncode is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            await self.kill()

    def log_tail(self, lines: int = 30) -> str:
        """The worker's last log lines."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Fleet:
    """API servers and workers of one namespace, and the directory their test shares."""

    directory: Path
    namespace: str
    env: dict[str, str]
    apis: list[ServerProcess] = field(default_factory=list)
    workers: list[WorkerProcess] = field(default_factory=list)

    async def add_api(self) -> ServerProcess:
        """Start one more API server and wait until it serves."""
        index = len(self.apis)
        env = dict(
            self.env,
            SARTIQ_COMPUTE_SERVER__PORT="0",
            SARTIQ_COMPUTE_SERVER__PORT_FILE=str(self.directory / f"api{index}.port"),
        )
        api = ServerProcess(
            [sys.executable, "-m", "server.compute.server"],
            env,
            self.directory,
            port_variable="SARTIQ_COMPUTE_SERVER__PORT_FILE",
            log_name=f"api{index}.log",
        )
        await api.start()
        self.apis.append(api)
        return api

    async def add_worker(self, *args: str) -> WorkerProcess:
        """Start one more worker (``args``: e.g. ``--task-types=VIDEO_GENERATION``)."""
        worker = WorkerProcess(self.directory, self.env, f"worker{len(self.workers)}", list(args))
        await worker.start()
        self.workers.append(worker)
        return worker

    async def wait_workers(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` worker processes report themselves alive."""

        async def alive() -> bool:
            return (await self.health()).capacity.workers >= count

        try:
            await assert_eventually(alive, timeout=timeout, interval=0.1)
        except AssertionError:
            logs = "\n".join(w.log_tail() for w in self.workers)
            raise AssertionError(f"{count} workers did not start:\n{logs}") from None

    def http(self, index: int = 0) -> httpx.AsyncClient:
        """A client of API server ``index``."""
        return httpx.AsyncClient(
            base_url=self.apis[index].url,
            headers={"authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )

    async def health(self) -> HealthAnswer:
        async with self.http() as http:
            return parse(HealthAnswer, (await http.get("/health")).content)

    async def task(self, task_id: str, index: int = 0) -> TaskAnswer:
        async with self.http(index) as http:
            answer = await http.get(f"/api/v1/tasks/{task_id}")
        assert answer.status_code == 200, answer.text
        return parse(TaskAnswer, answer.content)

    async def submit(
        self, task_type: str, parameters: dict[str, Any], key: str, index: int = 0
    ) -> TaskAnswer:
        async with self.http(index) as http:
            answer = await http.post(
                "/api/v1/tasks/",
                json={"task_type": task_type, "parameters": parameters, "idempotency_key": key},
            )
        assert answer.status_code == 201, answer.text
        return parse(TaskAnswer, answer.content)

    async def terminal(self, task_id: str, timeout: float = 60.0) -> TaskAnswer:
        """The task once it is terminal, read from the first API server."""
        return await self.terminal_at(task_id, 0, timeout)

    async def terminal_at(self, task_id: str, index: int, timeout: float = 60.0) -> TaskAnswer:
        """The task once it is terminal, read from API server ``index``."""
        latest: list[TaskAnswer] = []

        async def done() -> bool:
            latest[:] = [await self.task(task_id, index)]
            return latest[0].status in ("completed", "failed", "cancelled")

        await assert_eventually(done, timeout=timeout, interval=0.05)
        return latest[0]

    def release(self, tag: str) -> None:
        """Let the task held by ``tag`` go on."""
        (self.directory / tag).touch()

    def runs(self) -> Counter[str]:
        """How many times each tag's task started running."""
        path = self.directory / "runs.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return Counter(line.split()[0] for line in lines)

    def runners(self, tag: str) -> list[int]:
        """The pid of each process that started the tag's task."""
        path = self.directory / "runs.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [int(line.split()[1]) for line in lines if line.split()[0] == tag]

    async def close(self) -> None:
        for worker in self.workers:
            await worker.stop(10)
        for api in self.apis:
            if api.process is not None:
                await api.stop(10)


@asynccontextmanager
async def fleet(directory: Path, *, apis: int = 2, broker: str = "") -> AsyncIterator[Fleet]:
    """``apis`` API servers of a new namespace in ``directory``; workers: ``add_worker``.

    The broker is the Redis of the records unless ``broker`` names another (RabbitMQ).
    """
    namespace = f"test:{uuid.uuid4().hex[:12]}"
    running = Fleet(directory, namespace, _fleet_env(directory, namespace, broker))
    try:
        for _ in range(apis):
            await running.add_api()
        yield running
    finally:
        await running.close()
        await _forget(namespace)
        if broker:
            await asyncio.to_thread(_delete_queues, broker, namespace)


async def _forget(namespace: str) -> None:
    """Delete every key of the namespace (records, queues, counters)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        queue_prefix = namespace.replace(":", ".")
        for pattern in (f"{namespace}:*", f"{queue_prefix}.*"):
            async for key in client.scan_iter(match=pattern, count=500):
                await client.delete(key)
    finally:
        await client.aclose()


@contextmanager
def fleet_processes(directory: Path, *, apis: int = 2, workers: int = 2) -> Iterator[list[int]]:
    """A fleet for a whole test module (blocking): yields its API servers' ports.

    Each worker runs one pool process; the fleet's keys are deleted afterwards.
    """
    namespace = f"test:{uuid.uuid4().hex[:12]}"
    env = _fleet_env(directory, namespace)
    with ExitStack() as stack:
        ports = []
        for index in range(apis):
            api = ServerProcess(
                [sys.executable, "-m", "server.compute.server"],
                dict(
                    env,
                    SARTIQ_COMPUTE_SERVER__PORT="0",
                    SARTIQ_COMPUTE_SERVER__PORT_FILE=str(directory / f"api{index}.port"),
                ),
                directory,
                port_variable="SARTIQ_COMPUTE_SERVER__PORT_FILE",
                log_name=f"api{index}.log",
            )
            ports.append(stack.enter_context(api.running()))
        stack.callback(_forget_now, namespace)
        for index in range(workers):
            stack.enter_context(_worker_running(directory, env, f"worker{index}"))
        _wait_workers(ports[0], workers)
        yield ports


@contextmanager
def _worker_running(directory: Path, env: dict[str, str], name: str) -> Iterator[None]:
    with (directory / f"{name}.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.compute.fleet.worker", f"--name={name}@test"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _wait_workers(port: int, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        answer = parse(HealthAnswer, httpx.get(f"http://127.0.0.1:{port}/health").content)
        if answer.capacity.workers >= count:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} workers did not start within {timeout} s")
        time.sleep(0.1)  # polling the fleet's health, not waiting on a guess


def _delete_queues(broker: str, namespace: str) -> None:
    """Delete the fleet's queues from a RabbitMQ broker."""
    import kombu

    from server.domain.enums import TaskType

    with kombu.Connection(broker) as connection:
        channel = connection.default_channel
        for task_type in TaskType:
            name = f"{namespace.replace(':', '.')}.{task_type.value.lower()}"
            kombu.Queue(name).bind(channel).delete()


def _forget_now(namespace: str) -> None:
    asyncio.run(_forget(namespace))
