"""Several worker processes on one port, and one process per SQLite file, as real processes.

``SARTIQ_SERVER__WORKERS=N`` makes ``python -m server`` a supervisor of N workers sharing
its port; which worker served a call is read from the log lines every worker tags with
its index and pid.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_eventually, png_bytes
from pg import fresh_database, requires_postgres
from procs import ServerProcess, run_process, server_env

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import resources_pb2

SERVER = [sys.executable, "-m", "server"]


def _lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def _serving(server: ServerProcess) -> dict[int, int]:
    """The pid of each worker index, from its latest "serving on" line."""
    return {
        line["worker"]: line["pid"]
        for line in _lines(server)
        if line["logger"] == "server.app" and line["message"].startswith("serving on")
    }


def _served_by(server: ServerProcess, method: str) -> set[int]:
    """The worker indexes that answered calls of ``method``."""
    return {
        line["worker"]
        for line in _lines(server)
        if line["logger"] == "sartiq.access" and line.get("rpc_method", "").endswith(method)
    }


async def _stop(server: ServerProcess) -> None:
    """Kill the supervisor and any worker it left behind (only when the test failed)."""
    await server.kill()
    for line in _lines(server) if server.log_path.exists() else []:
        if "worker" in line and _alive(line["pid"]) and _ours(line["pid"], server):
            os.kill(line["pid"], signal.SIGKILL)


def _ours(pid: int, server: ServerProcess) -> bool:
    """Whether ``pid`` is still a worker of this test's server (pids are reused)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return str(server.workdir).encode() in environ


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def _workers_serving(server: ServerProcess, old: dict[int, int]) -> dict[int, int]:
    """Wait until every worker logged that it serves, with a pid not in ``old``."""
    latest: dict[int, int] = {}

    async def all_new() -> bool:
        latest.update(_serving(server))
        return set(latest) == {0, 1} and not set(latest.values()) & set(old.values())

    await assert_eventually(all_new, timeout=90, interval=0.1)
    return latest


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    async with fresh_database() as url:
        yield url


async def test_sqlite_refuses_several_workers(tmp_path: Path) -> None:
    env = server_env(tmp_path, SERVER__WORKERS="2")
    child = await run_process(SERVER, env=env)
    assert child.returncode == 2
    assert "SARTIQ_SERVER__WORKERS=2 needs PostgreSQL" in child.stderr
    assert not (tmp_path / "port").exists()


async def test_a_second_process_on_one_sqlite_file_is_refused(tmp_path: Path) -> None:
    first = ServerProcess.service(tmp_path)
    await first.start()
    try:
        second = tmp_path / "second"
        env = server_env(second, DATABASE__URL=first.env["SARTIQ_DATABASE__URL"])
        child = await run_process(SERVER, env=env, timeout=30)
        assert child.returncode == 2
        assert f"another server process (pid {first.pid}) is using the SQLite database" in (
            child.stderr
        )
        assert not (second / "port").exists()
    finally:
        assert await first.stop() == 0


@requires_postgres
@pytest.mark.timeout(240)
async def test_workers_share_one_port_and_a_client_spreads_over_them(
    tmp_path: Path, pg_url: str
) -> None:
    server = ServerProcess.service(
        tmp_path,
        DATABASE__URL=pg_url,
        SERVER__WORKERS="2",
        SERVER__MAX_CONNECTION_AGE="0.5",
        SERVER__MAX_CONNECTION_AGE_GRACE="0.2",
    )
    await server.start(timeout=120)
    try:
        # The port file is written once every worker serves (and each logs it first).
        workers = _serving(server)
        assert set(workers) == {0, 1}
        async with SartiqClient(f"dns:///127.0.0.1:{server.port}") as client:

            async def both_answered() -> bool:
                await client.list()  # one connection at a time; each new one may land anywhere
                return _served_by(server, "/ListGenerations") == {0, 1}

            await assert_eventually(both_answered, timeout=60, interval=0.05)
        assert await server.stop(timeout=60) == 0
        assert not any(_alive(pid) for pid in workers.values())
    finally:
        await _stop(server)


async def _collect(
    events: AsyncIterator[resources_pb2.GenerationEvent],
    into: list[resources_pb2.GenerationEvent],
    terminals: int,
) -> None:
    async for event in events:
        into.append(event)
        terminals -= event.terminal
        if not terminals:
            return


async def _generate(client: SartiqClient, product_id: str) -> str:
    await client.connect(60)
    generation = await client.generate(
        product_id=product_id, shot_type_string="front", width=64, height=64
    )
    return generation.id


@requires_postgres
@pytest.mark.timeout(240)
async def test_killed_workers_are_restarted_and_a_watch_resumes_on_them(
    tmp_path: Path, pg_url: str
) -> None:
    server = ServerProcess.service(
        tmp_path, DATABASE__URL=pg_url, SERVER__WORKERS="2", SERVER__HEARTBEAT_INTERVAL="0.2"
    )
    await server.start(timeout=120)
    try:
        before = await _workers_serving(server, {})
        async with SartiqClient(f"dns:///127.0.0.1:{server.port}") as client:
            product = await client.create_entity("product", "coat", images=[png_bytes((3, 3, 3))])
            events: list[resources_pb2.GenerationEvent] = []
            cuts: list[str] = []
            watching = asyncio.create_task(
                _collect(client.watch_generations(after_cursor=0, on_wait=cuts.append), events, 2)
            )
            first = await _generate(client, product.id)

            async def first_done() -> bool:
                return any(e.terminal for e in events)

            await assert_eventually(first_done, timeout=60)
            for pid in before.values():
                os.kill(pid, signal.SIGKILL)
            after = await _workers_serving(server, before)
            second = await _generate(client, product.id)
            await asyncio.wait_for(watching, 60)
        assert cuts, "the watch was never cut"
        assert [e.cursor for e in events] == list(range(1, len(events) + 1))
        for generation_id in (first, second):
            sequences = [e.sequence for e in events if e.generation_id == generation_id]
            assert sequences == list(range(1, len(sequences) + 1))
            assert sequences, generation_id
        # The supervisor dies without a word: its workers notice and stop by themselves.
        await server.kill()

        async def workers_gone() -> bool:
            return not any(_alive(pid) for pid in after.values())

        await assert_eventually(workers_gone, timeout=60, interval=0.1)
    finally:
        await _stop(server)


@requires_postgres
@pytest.mark.timeout(240)
async def test_workers_dying_past_the_bound_stop_the_server(tmp_path: Path, pg_url: str) -> None:
    server = ServerProcess.service(
        tmp_path, DATABASE__URL=pg_url, SERVER__WORKERS="2", SERVER__WORKER_RESTARTS="1"
    )
    await server.start(timeout=120)
    try:
        before = await _workers_serving(server, {})
        os.kill(before[0], signal.SIGKILL)

        async def restarted() -> bool:
            return _serving(server)[0] != before[0]

        await assert_eventually(restarted, timeout=90, interval=0.1)
        os.kill(before[1], signal.SIGKILL)  # the second death within a minute
        assert await asyncio.wait_for(server.wait_exit(), 60) == 1
        assert not any(_alive(pid) for pid in _serving(server).values())
        assert "is the limit (SARTIQ_SERVER__WORKER_RESTARTS)" in server.log_path.read_text()
    finally:
        await _stop(server)
