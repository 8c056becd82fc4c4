"""Chaos: a real server process under load, ``kill -9``'d at random moments and restarted.

The load is what production sends: creates, idempotent retries of the same request,
watchers that resume with ``after_sequence`` and watchers that close their streams
mid-way. The server (``python -m server``: SQLite, local CPU compute) is killed at
seeded random moments, its very first start included, and restarted each time. At the
end every promise is checked through the API and on disk:

* no acknowledged generation is lost, and no ``request_id`` maps to two generations;
* every generation is terminal, and every one COMPLETED (none may fail here);
* every completed prediction's artifact is on disk with its sha256;
* every event log is gap-free from 1, and every resuming watcher saw each event once;
* the server never exited except when killed.

Separately, fresh databases are killed during their first start (migration included)
and must start afterwards. ``make test`` runs a short round; the long one is::

    .venv/bin/python tests/chaos_harness.py --long [--seed N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TERMINAL, CatalogStub, GenerationStub, png_bytes
from procs import ServerProcess

from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2
from sartiq_grpc.sartiq.generation.v1 import (
    enums_pb2,
    generation_service_pb2,
    resources_pb2,
)
from server.media.artifacts import FileArtifactStore

T = TypeVar("T")
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
}
CALL_TIMEOUT = 15.0


@dataclass(frozen=True)
class ChaosConfig:
    """How hard to shake the server."""

    seed: int = 1
    seconds: float = 12.0
    kills: int = 3
    first_start_trials: int = 2
    creators: int = 4
    mid_way_closers: int = 2
    settle_timeout: float = 60.0

    @classmethod
    def long(cls, seed: int) -> ChaosConfig:
        """The long run: at least ten kills under load and ten killed first starts."""
        return cls(seed=seed, seconds=120.0, kills=12, first_start_trials=10, creators=6)


@dataclass
class ChaosReport:
    """What happened, and every broken promise counted."""

    kills: int = 0
    kills_during_first_start: int = 0
    first_start_trials: int = 0
    first_start_kills_in_migration: int = 0
    first_start_failures: int = 0
    acknowledged: int = 0
    idempotent_replays: int = 0
    generations: int = 0
    completed: int = 0
    artifacts_verified: int = 0
    events_checked: int = 0
    resumed_watchers: int = 0
    watcher_reconnects: int = 0
    streams_closed_mid_way: int = 0
    lost: int = 0
    duplicated: int = 0
    stuck: int = 0
    failed: int = 0
    wrong: int = 0
    gaps: int = 0
    unexpected_exits: int = 0
    unexpected_errors: int = 0
    problems: list[str] = field(default_factory=list)

    def broken(self, counter: str, detail: str) -> None:
        """Count one broken promise and keep a few details."""
        setattr(self, counter, getattr(self, counter) + 1)
        if len(self.problems) < 20:
            self.problems.append(f"{counter}: {detail}")

    @property
    def ok(self) -> bool:
        """True when no promise was broken."""
        return not any(
            (
                self.lost,
                self.duplicated,
                self.stuck,
                self.failed,
                self.wrong,
                self.gaps,
                self.unexpected_exits,
                self.unexpected_errors,
                self.first_start_failures,
            )
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Supervisor:
    """Owns the server process: kills, restarts, and notices deaths it did not cause."""

    def __init__(self, workdir: Path, port: int, report: ChaosReport) -> None:
        self.server = ServerProcess.service(
            workdir,
            SERVER__PORT=str(port),
            SERVER__HEARTBEAT_INTERVAL="0.5",
            COMPUTE__LOCAL_WORKERS="2",
            ORCHESTRATION__MAX_TASKS_IN_FLIGHT="4",
        )
        self.report = report
        self.killing = False

    async def start(self) -> None:
        await self.server.start()

    async def kill_and_restart(self) -> None:
        self.killing = True
        await self.server.kill()
        self.report.kills += 1
        await self.server.start()
        self.killing = False

    async def kill_first_start(self, rng: random.Random) -> None:
        """Kill the very first start at a random moment, then start again."""
        await self.server.spawn()
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        self.killing = True
        await self.server.kill()
        self.report.kills += 1
        self.report.kills_during_first_start += 1
        await self.server.start()
        self.killing = False

    async def watch_for_deaths(self) -> None:
        while True:
            await asyncio.sleep(0.05)  # polling interval of a supervisor, not a wait
            code = self.server.returncode
            if code is not None and not self.killing:
                self.report.broken("unexpected_exits", f"exit {code}: {self.server.log_tail(5)}")
                await self.server.start()


async def _call(
    report: ChaosReport, what: str, make: Callable[[], Awaitable[T]], deadline: float
) -> T | None:
    """Retry a call through kills until it succeeds; None (and counted) when it cannot."""
    while True:
        try:
            return await make()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE or time.monotonic() > deadline:
                report.broken("unexpected_errors", f"{what}: {exc.code().name} {exc.details()}")
                return None
            await asyncio.sleep(0.05)  # back off before retrying a refused call


class _Load:
    """Creates, idempotent replays and watchers against one server address."""

    def __init__(self, target: str, config: ChaosConfig, report: ChaosReport) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = GenerationStub(self.channel)
        self.catalog = CatalogStub(self.channel)
        self.config = config
        self.report = report
        self.acked: dict[str, str] = {}  # request_id -> generation id
        self.requests: dict[str, generation_service_pb2.CreateGenerateGenerationRequest] = {}
        self.watch_results: list[tuple[str, list[int], bool]] = []
        self.product_id = ""
        self.stop = asyncio.Event()

    async def prepare(self) -> None:
        request = catalog_service_pb2.CreateProductRequest(
            name="chaos dress",
            reference_images=[catalog_service_pb2.ImageInput(data=png_bytes((180, 20, 60)))],
        )
        response = await _call(
            self.report,
            "CreateProduct",
            lambda: self.catalog.CreateProduct(request, timeout=CALL_TIMEOUT, wait_for_ready=True),
            time.monotonic() + 120,
        )
        if response is None:
            raise AssertionError(f"could not create the product: {self.report.problems}")
        self.product_id = response.product.id

    def _request(
        self, rng: random.Random
    ) -> generation_service_pb2.CreateGenerateGenerationRequest:
        return generation_service_pb2.CreateGenerateGenerationRequest(
            request_id=f"chaos-{uuid.UUID(int=rng.getrandbits(128)).hex}",
            labels={"run": "chaos"},
            params=resources_pb2.GenerateParams(
                product_id=self.product_id,
                shot_type_string="full-body front",
                batch_size=rng.randint(1, 3),
                width=64,
                height=64,
                seed=rng.randrange(2**31),
            ),
        )

    async def _create(self, request: generation_service_pb2.CreateGenerateGenerationRequest) -> str:
        response = await _call(
            self.report,
            "CreateGeneration",
            lambda: self.stub.CreateGenerateGeneration(
                request, timeout=CALL_TIMEOUT, wait_for_ready=True
            ),
            time.monotonic() + 120,
        )
        return "" if response is None else response.generation.id

    async def creator(self, rng: random.Random) -> None:
        async with asyncio.TaskGroup() as watchers:
            while not self.stop.is_set():
                if self.acked and rng.random() < 0.25:
                    request_id = rng.choice(sorted(self.acked))
                    replayed = await self._create(self.requests[request_id])
                    self.report.idempotent_replays += 1
                    if replayed and replayed != self.acked[request_id]:
                        self.report.broken("duplicated", f"{request_id} -> two ids on replay")
                    continue
                request = self._request(rng)
                self.requests[request.request_id] = request
                generation_id = await self._create(request)
                if not generation_id:
                    continue
                self.acked[request.request_id] = generation_id
                self.report.acknowledged += 1
                if rng.random() < 0.3:
                    watchers.create_task(self.resuming_watcher(generation_id))

    async def resuming_watcher(self, generation_id: str) -> None:
        """Follow a generation to its end through kills, resuming from the last sequence."""
        seen: list[int] = []
        ended = False
        self.report.resumed_watchers += 1
        deadline = time.monotonic() + self.config.seconds + self.config.settle_timeout
        while not ended and time.monotonic() < deadline:
            after = seen[-1] if seen else 0
            call = self.stub.WatchGeneration(
                generation_service_pb2.WatchGenerationRequest(
                    generation_id=generation_id, after_sequence=after
                ),
                wait_for_ready=True,
            )
            try:
                async for item in call:
                    if item.HasField("event"):
                        seen.append(item.event.sequence)
                        ended = ended or item.event.terminal
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    self.report.broken("unexpected_errors", f"watch: {exc.code().name}")
                    break
                self.report.watcher_reconnects += 1
                await asyncio.sleep(0.05)  # back off before resuming
        self.watch_results.append((generation_id, seen, ended))

    async def mid_way_closer(self, rng: random.Random) -> None:
        """Open watch streams and abandon them after a few events."""
        while not self.stop.is_set():
            if not self.acked:
                await asyncio.sleep(0.05)  # nothing to watch yet
                continue
            generation_id = self.acked[rng.choice(sorted(self.acked))]
            call = self.stub.WatchGeneration(
                generation_service_pb2.WatchGenerationRequest(generation_id=generation_id)
            )
            with contextlib.suppress(grpc.aio.AioRpcError):
                for _ in range(rng.randint(1, 3)):
                    if await call.read() is grpc.aio.EOF:  # type: ignore[attr-defined]
                        break
            call.cancel()
            self.report.streams_closed_mid_way += 1

    async def close(self) -> None:
        await self.channel.close(grace=None)


async def _verify(
    load: _Load, report: ChaosReport, settle_timeout: float, artifacts: FileArtifactStore
) -> None:
    """Check every promise through the API and on disk."""
    stub = load.stub
    deadline = time.monotonic() + settle_timeout
    final: dict[str, resources_pb2.Generation] = {}
    for request_id, generation_id in sorted(load.acked.items()):
        while True:
            try:
                got = await stub.GetGeneration(
                    generation_service_pb2.GetGenerationRequest(generation_id=generation_id),
                    timeout=CALL_TIMEOUT,
                    wait_for_ready=True,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    report.broken("lost", f"{request_id} -> {generation_id}")
                    break
                raise
            if got.generation.status in TERMINAL or time.monotonic() > deadline:
                final[generation_id] = got.generation
                break
            await asyncio.sleep(0.1)  # polling until the engine settles
    await _check_uniqueness(load, report)
    for generation in final.values():
        _check_generation(generation, report, artifacts)
        await _check_log(stub, generation, report)
    for generation_id, seen, ended in load.watch_results:
        if not ended or seen != list(range(seen[0], seen[0] + len(seen))) or seen[0] != 1:
            report.broken("gaps", f"watcher of {generation_id} saw {seen[:5]}... ended={ended}")


async def _check_uniqueness(load: _Load, report: ChaosReport) -> None:
    by_request: dict[str, set[str]] = {}
    token = ""
    while True:
        page = await load.stub.ListGenerations(
            generation_service_pb2.ListGenerationsRequest(page_size=100, page_token=token),
            timeout=CALL_TIMEOUT,
        )
        for generation in page.generations:
            by_request.setdefault(generation.request_id, set()).add(generation.id)
            report.generations += 1
        token = page.next_page_token
        if not token:
            break
    for request_id, ids in by_request.items():
        if len(ids) > 1:
            report.broken("duplicated", f"{request_id} -> {sorted(ids)}")
    unacknowledged = set(by_request) - set(load.acked)
    for request_id in unacknowledged:
        # Created but never acknowledged is allowed only for a create whose answer a
        # kill swallowed; every create here is retried until acknowledged.
        report.broken("wrong", f"{request_id} exists but was never acknowledged")


def _check_generation(
    generation: resources_pb2.Generation, report: ChaosReport, artifacts: FileArtifactStore
) -> None:
    if generation.status not in TERMINAL:
        report.broken("stuck", f"{generation.id} still {generation.status}")
        return
    if generation.status != enums_pb2.GENERATION_STATUS_COMPLETED:
        report.broken("failed", f"{generation.id}: {generation.error.reason} {generation.error}")
        return
    report.completed += 1
    for prediction in generation.predictions:
        artifact = prediction.artifact
        try:
            path = artifacts.find_sync(artifact.sha256)
        except FileNotFoundError:
            report.broken("wrong", f"{prediction.id}: {artifact.sha256} missing")
            continue
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != artifact.sha256 or len(data) != artifact.size_bytes:
            report.broken("wrong", f"{prediction.id}: {path} does not match its sha256")
            continue
        report.artifacts_verified += 1


async def _check_log(
    stub: GenerationStub, generation: resources_pb2.Generation, report: ChaosReport
) -> None:
    call = stub.WatchGeneration(
        generation_service_pb2.WatchGenerationRequest(generation_id=generation.id),
        timeout=CALL_TIMEOUT,
    )
    events = [item.event async for item in call if item.HasField("event")]
    sequences = [e.sequence for e in events]
    report.events_checked += len(events)
    expected = list(range(1, generation.last_event_sequence + 1))
    if sequences != expected or not events[-1].terminal:
        report.broken("gaps", f"{generation.id}: {sequences[:8]}... vs 1..{expected[-1:]}")


async def _first_start_trial(root: Path, rng: random.Random, report: ChaosReport) -> None:
    """Kill a fresh database's first start at a random moment; it must start after."""
    workdir = Path(tempfile.mkdtemp(dir=root, prefix="first-start-"))
    server = ServerProcess.service(workdir)
    report.first_start_trials += 1
    await server.spawn()
    if rng.random() < 0.5:
        # Aim at the migration itself: kill just after it announced the upgrade.
        # The child's log file is the only signal: poll it (no event crosses processes).
        while "Running upgrade" not in server.log_tail(50) and server.returncode is None:  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        await asyncio.sleep(rng.uniform(0.0, 0.02))
    else:
        await asyncio.sleep(rng.uniform(0.0, 2.0))
    await server.kill()
    log = server.log_tail(200)
    if "Running upgrade" in log and "serving on" not in log:
        report.first_start_kills_in_migration += 1
    try:
        await server.start(timeout=60)
    except AssertionError as exc:
        report.broken("first_start_failures", str(exc)[-300:])
        return
    if await server.stop() != 0:
        report.broken("first_start_failures", f"unclean stop: {server.log_tail(5)}")


async def run_chaos(config: ChaosConfig, root: Path) -> ChaosReport:
    """One chaos run under ``root``; returns the report (``report.ok`` tells the verdict)."""
    rng = random.Random(config.seed)
    report = ChaosReport()
    for _ in range(config.first_start_trials):
        await _first_start_trial(root, rng, report)
    port = _free_port()
    supervisor = _Supervisor(root, port, report)
    await supervisor.kill_first_start(rng)
    load = _Load(f"127.0.0.1:{port}", config, report)
    deaths = asyncio.create_task(supervisor.watch_for_deaths())
    try:
        await load.prepare()
        async with asyncio.TaskGroup() as group:
            workers = [
                group.create_task(load.creator(random.Random(rng.random())))
                for _ in range(config.creators)
            ]
            workers += [
                group.create_task(load.mid_way_closer(random.Random(rng.random())))
                for _ in range(config.mid_way_closers)
            ]
            moments = sorted(rng.uniform(0.5, config.seconds) for _ in range(config.kills))
            started = time.monotonic()
            for moment in moments:
                await asyncio.sleep(max(0.0, started + moment - time.monotonic()))
                await supervisor.kill_and_restart()
            await asyncio.sleep(max(0.0, started + config.seconds - time.monotonic()))
            load.stop.set()
        artifacts = FileArtifactStore(Path(supervisor.server.env["SARTIQ_MEDIA__ARTIFACT_DIR"]))
        await _verify(load, report, config.settle_timeout, artifacts)
    finally:
        deaths.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await deaths
        await load.close()
        code = await supervisor.server.stop()
        if code != 0:
            report.broken("unexpected_exits", f"graceful stop ended with {code}")
    return report


def main() -> None:
    """Run chaos from the command line and print the report as JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--long", action="store_true", help="the long run (>= 10 kills)")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    config = ChaosConfig.long(args.seed) if args.long else ChaosConfig(seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="sartiq-chaos-") as tmp:
        report = asyncio.run(run_chaos(config, Path(tmp)))
    print(json.dumps({"config": asdict(config), "report": asdict(report)}, indent=2))
    raise SystemExit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
