"""Replica processes on one PostgreSQL database sharing one holding compute server.

For the ownership, takeover and fencing tests (``tests/system/test_replica_takeover.py``):

* ``Compute``: ``tests/holding_compute.py`` in its own process, which holds every task
  until released (or for a set time) and tells, per idempotency key, who submitted it
  how many times, who followed it and who cancelled it;
* ``Replica``: one ``python -m server`` over the http compute backend, started, killed
  (SIGKILL), paused (SIGSTOP/SIGCONT), stopped (SIGTERM) and started again in the same
  place (``restart``, with the same replica name when it has one). Each incarnation
  calls compute with a token of its own (``token``), so every compute call is
  attributed to the process that made it;
* ``Database``: the rows the assertions read directly (owners, fences, events, tasks);
* ``check_logs``: the checks every test ends with (gap-free events, per-organization
  cursors, one submit per compute task).

Replicas share one artifact directory (a volume every replica mounts): a replica that
takes a generation over reads the inputs another stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
from helpers import GenerationStub, assert_eventually
from procs import TESTS_DIR, ServerProcess
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

LEASE = 4.0


class Compute:
    """The holding compute server (``tests/holding_compute.py``) in its own process."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        port_file = workdir / "compute.port"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SARTIQ_")}
        env.update(HOLDING_COMPUTE_PORT_FILE=str(port_file), PYTHONFAULTHANDLER="1")
        self.process = ServerProcess(
            [sys.executable, str(TESTS_DIR / "holding_compute.py"), str(port_file)],
            env,
            workdir,
            port_variable="HOLDING_COMPUTE_PORT_FILE",
            log_name="compute.log",
        )
        self._http: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        return self.process.url

    async def start(self) -> None:
        await self.process.start()
        self._http = httpx.AsyncClient(base_url=self.url, timeout=10)

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.aclose()
        if self.process.process is not None:
            await self.process.stop()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self._http is not None
        answer = await self._http.request(method, path, **kwargs)
        answer.raise_for_status()
        return answer.json()

    async def release(self, keys: list[str] | None = None) -> None:
        """Complete the held tasks of these idempotency keys (None: every held task)."""
        await self._call("POST", "/control/release", json={} if keys is None else {"keys": keys})

    async def hold_for(self, seconds: float | None) -> None:
        """Tasks complete ``seconds`` after their submit (None: held until released)."""
        await self._call("POST", "/control/mode", json={"hold_seconds": seconds})

    async def tasks(self) -> dict[str, dict[str, Any]]:
        """Every task compute was asked for, by idempotency key (``holding_compute``)."""
        state = await self._call("GET", "/control/state")
        return {task["key"]: task for task in state["tasks"]}


class Replica:
    """One replica: a ``python -m server`` process, and its later incarnations."""

    def __init__(self, workdir: Path, settings: dict[str, str], *, label: str) -> None:
        self.workdir = workdir
        self.settings = settings
        self.label = label  # the test's name for it (its replica name when it has one)
        self.incarnation = 0
        self.process = self._process()
        self.channel: grpc.aio.Channel | None = None
        self.stub: GenerationStub | None = None

    @property
    def name(self) -> str | None:
        """The replica name it was given (None: the server's default)."""
        return self.settings.get("SERVER__REPLICA_NAME")

    @property
    def token(self) -> str:
        """The compute token of the current incarnation: how compute names this process."""
        return f"{self.label}#{self.incarnation}"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def _process(self) -> ServerProcess:
        settings = {**self.settings, "COMPUTE__TOKEN": self.token}
        process = ServerProcess.service(self.workdir, **settings)
        process.log_path = self.workdir / f"server-{self.incarnation}.log"
        return process

    async def start(self) -> None:
        await self.process.start()
        self.channel = grpc.aio.insecure_channel(self.process.target)
        self.stub = GenerationStub(self.channel)

    async def close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close(None)
            self.channel = None
            self.stub = None

    async def kill(self) -> None:
        await self.process.kill()
        await self.close_channel()

    async def terminate(self) -> int:
        """SIGTERM, and wait for it to end."""
        code = await self.process.stop()
        await self.close_channel()
        return code

    def pause(self) -> None:
        """SIGSTOP: the process stops where it is, its connections left open."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT."""
        os.kill(self.process.pid, signal.SIGCONT)

    async def restart(self) -> None:
        """Start the next incarnation in the same place (same name, same settings)."""
        assert self.process.returncode is not None, "the previous incarnation still runs"
        self.incarnation += 1
        self.process = self._process()
        await self.start()

    async def shutdown(self) -> None:
        """End whatever runs, whatever state it is in (the test's cleanup)."""
        if self.process.process is not None and self.process.returncode is None:
            self.resume()
            await self.process.kill()
        await self.close_channel()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log records of the current incarnation."""
        records = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records


@dataclass(frozen=True)
class GenerationRow:
    id: str
    organization: str
    status: str
    owner: str | None
    fence: int
    event_seq: int
    cancel_requested_at: Any


@dataclass(frozen=True)
class EventRow:
    generation_id: str
    sequence: int
    cursor: int
    organization: str
    terminal: bool
    kind: str
    generation_status: str


@dataclass(frozen=True)
class TaskRow:
    id: str
    generation_id: str
    status: str
    attempt: int
    compute_task_id: str | None


class Database:
    """Direct reads of the deployment's PostgreSQL database."""

    def __init__(self, url: str) -> None:
        self.engine: AsyncEngine = create_async_engine(url, pool_size=2, max_overflow=2)

    async def close(self) -> None:
        await self.engine.dispose()

    async def _rows(self, query: str, **params: Any) -> list[Any]:
        async with self.engine.connect() as conn:
            return list(await conn.execute(text(query), params))

    async def generations(self) -> dict[str, GenerationRow]:
        rows = await self._rows(
            "SELECT id, organization, status, owner, fence, event_seq, cancel_requested_at "
            "FROM generations"
        )
        return {row.id: GenerationRow(*row) for row in rows}

    async def events(self) -> list[EventRow]:
        rows = await self._rows(
            'SELECT generation_id, sequence, "cursor", organization, terminal, kind, '
            'generation_status FROM generation_events ORDER BY organization, "cursor"'
        )
        return [EventRow(*row) for row in rows]

    async def tasks(self) -> dict[str, TaskRow]:
        rows = await self._rows(
            "SELECT id, generation_id, status, attempt, compute_task_id FROM tasks"
        )
        return {row.id: TaskRow(*row) for row in rows}

    async def wait_attached(self, count: int, timeout: float = 20.0) -> dict[str, TaskRow]:
        """Wait until ``count`` tasks have their compute id stored; the tasks then."""
        latest: dict[str, TaskRow] = {}

        async def attached() -> bool:
            latest.clear()
            latest.update(await self.tasks())
            return sum(1 for t in latest.values() if t.compute_task_id) >= count

        await assert_eventually(attached, timeout=timeout, interval=0.05)
        return latest

    async def wait_statuses(
        self, ids: set[str], statuses: set[str], timeout: float
    ) -> dict[str, GenerationRow]:
        """Wait until each generation of ``ids`` has one of ``statuses``; the rows then."""
        latest: dict[str, GenerationRow] = {}

        async def reached() -> bool:
            latest.clear()
            latest.update(await self.generations())
            return all(latest[i].status in statuses for i in ids)

        try:
            await assert_eventually(reached, timeout=timeout, interval=0.05)
        except AssertionError:
            behind = {i: latest[i].status for i in ids if latest[i].status not in statuses}
            raise AssertionError(f"{len(behind)} generations not {statuses}: {behind}") from None
        return latest


@contextlib.asynccontextmanager
async def deployment(
    tmp_path: Path, url: str, compute: Compute, **common: str
) -> AsyncIterator[Deployment]:
    """Replicas of one deployment; every one still running is killed at the end."""
    shared = tmp_path / "artifacts"
    shared.mkdir()
    built = Deployment(tmp_path, url, compute, shared, common)
    try:
        yield built
    finally:
        await asyncio.gather(*(r.shutdown() for r in built.replicas))


class Deployment:
    """Replicas on one database and one artifact directory, using one compute server."""

    def __init__(
        self, tmp_path: Path, url: str, compute: Compute, shared: Path, common: dict[str, str]
    ) -> None:
        self.tmp_path = tmp_path
        self.settings = {
            "DATABASE__URL": url,
            "MEDIA__ARTIFACT_DIR": str(shared),
            "COMPUTE__BACKEND": "http",
            "COMPUTE__URL": compute.url,
            "COMPUTE__TIMEOUT": "3",
            "ORCHESTRATION__LEASE_SECONDS": str(LEASE),
            "ORCHESTRATION__MAX_TASKS_IN_FLIGHT": "64",
            "ORCHESTRATION__PROGRESS_INTERVAL": "0",
            "SERVER__HEARTBEAT_INTERVAL": "30",
            "SERVER__GRACE_PERIOD": "5",
            **{key.upper(): value for key, value in common.items()},
        }
        self.replicas: list[Replica] = []

    def add(self, label: str, *, name: str | None = None, **settings: str) -> Replica:
        """A new replica (not started); ``name`` sets ``SARTIQ_SERVER__REPLICA_NAME``."""
        workdir = self.tmp_path / label
        workdir.mkdir()
        own = {**self.settings, **{key.upper(): value for key, value in settings.items()}}
        if name is not None:
            own["SERVER__REPLICA_NAME"] = name
        replica = Replica(workdir, own, label=label)
        self.replicas.append(replica)
        return replica

    async def start(self, *labels: str, named: bool = False) -> list[Replica]:
        """Add and start replicas together (named after their labels when ``named``)."""
        added = [self.add(label, name=label if named else None) for label in labels]
        await asyncio.gather(*(r.start() for r in added))
        return added


async def check_logs(
    db: Database, compute: Compute, ids: set[str], *, status: str = "COMPLETED"
) -> list[EventRow]:
    """Every generation of ``ids`` ended ``status`` with a whole log; compute was asked once.

    * each generation's events have sequences 1..n (n = its ``event_seq``), none missing
      or repeated, and one terminal event, the last;
    * per organization, the events' cursors are 1..N, none missing or repeated;
    * every compute task of these generations was submitted once (one POST of its
      idempotency key, whoever sent it), and compute holds no task unknown to the store.

    Returns every event row.
    """
    generations = await db.generations()
    assert set(generations) == ids, "the store holds generations nobody created, or lost some"
    wrong = {i: g.status for i, g in generations.items() if g.status != status}
    assert not wrong, f"not {status}: {wrong}"
    events = await db.events()
    by_generation: dict[str, list[EventRow]] = defaultdict(list)
    by_organization: dict[str, list[int]] = defaultdict(list)
    for event in events:
        by_generation[event.generation_id].append(event)
        by_organization[event.organization].append(event.cursor)
    for generation_id, generation in generations.items():
        log = sorted(by_generation[generation_id], key=lambda e: e.sequence)
        sequences = [e.sequence for e in log]
        assert sequences == list(range(1, generation.event_seq + 1)), (generation_id, sequences)
        terminal = [e.sequence for e in log if e.terminal]
        assert terminal == [generation.event_seq], (generation_id, "terminal events", terminal)
        assert log[-1].generation_status == status, (generation_id, log[-1])
    for organization, cursors in by_organization.items():
        assert sorted(cursors) == list(range(1, len(cursors) + 1)), (organization, cursors)
    tasks = await db.tasks()
    remote = await compute.tasks()
    twice = {
        f"{key} ({task['id']}, generation {tasks[key].generation_id})": task["submits"]
        for key, task in remote.items()
        if len(task["submits"]) != 1 and key in tasks
    }
    assert not twice, f"compute tasks not submitted exactly once (key: submitters): {twice}"
    unknown = set(remote) - set(tasks)
    assert not unknown, f"compute was asked for tasks the store does not know: {unknown}"
    if status == "COMPLETED":
        unfinished = {k: t["status"] for k, t in remote.items() if t["status"] != "completed"}
        assert not unfinished, f"compute tasks not completed: {unfinished}"
        released = {k: t["cancels"] for k, t in remote.items() if t["cancels"]}
        assert not released, f"compute tasks of completed generations were cancelled: {released}"
    return events


class Timer:
    """Seconds since it was made (time.monotonic)."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start


__all__ = [
    "LEASE",
    "Compute",
    "Database",
    "Deployment",
    "EventRow",
    "GenerationRow",
    "Replica",
    "TaskRow",
    "Timer",
    "check_logs",
    "deployment",
]
