"""The composition root: builds every collaborator from the settings and owns their lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from server.api.auth import Authenticator, JwtVerifier, is_loopback, load_keys
from server.api.server import GrpcServer, Services, build_server
from server.api.tls import TlsCredentials
from server.artifacts.service import ArtifactService
from server.catalog.service import CatalogService
from server.compute.base import ComputeBackend, ComputeError
from server.compute.breaker import Breakers, BreakerSettings
from server.compute.http import HttpComputeBackend
from server.compute.local import LocalComputeBackend
from server.compute.processors.tasks import default_registry
from server.compute.retry import RetryPolicy
from server.config import ServerSettings, Settings
from server.domain.enums import GenerationType
from server.domain.errors import StartupError
from server.domain.limits import RateLimiter, RetryDelay, TokenBuckets
from server.domain.paging import PageTokens
from server.evaluation.base import Evaluator, Evaluators
from server.evaluation.local import LocalEvaluator
from server.evaluation.remote import RemoteEvaluator
from server.logs import install_redaction
from server.media.backends import open_storage
from server.media.fetch import Fetcher, InputFetcher
from server.media.references import ReferencePolicy
from server.media.storage import ArtifactStorage, blocking_reader
from server.orchestration.agentic_flow import AgenticWorkflow
from server.orchestration.base_flow import BaseWorkflow
from server.orchestration.closing import release_policy
from server.orchestration.engine import Engine
from server.orchestration.inputs import InputPreparer
from server.orchestration.service import GenerationService
from server.orchestration.steps import TaskRunner
from server.orchestration.watch import Watcher
from server.orchestration.workflows import WorkflowRegistry
from server.store.db import (
    create_engine,
    create_session_factory,
    is_sqlite,
    sqlite_path,
)
from server.store.events import EventBus
from server.store.leases import Leases, Wakeups
from server.store.listener import EventListener, asyncpg_connector
from server.store.live_counts import LiveLimits
from server.store.lock import DatabaseLock
from server.store.migrate import upgrade_to_head
from server.store.rate_buckets import DatabaseTokenBuckets
from server.store.secrets import PAGE_TOKENS, shared_secret
from server.store.sessions import Store
from server.store.writer import Writer, WriterStats
from server.strategies.adjusting import ImageAdjustingStrategy
from server.strategies.background import BackgroundFixingStrategy
from server.strategies.base import StrategyRegistry
from server.strategies.editing import EditingStrategy
from server.strategies.face import FaceFixingStrategy
from server.strategies.generate import GenerateStrategy
from server.strategies.refine import RefineStrategy
from server.strategies.video import VideoStrategy

log = logging.getLogger(__name__)


def _breakers(settings: Settings) -> Breakers:
    """The circuit breakers of the remote compute calls, one per operation."""
    c = settings.compute
    return Breakers(
        BreakerSettings(
            window_s=c.breaker_window,
            min_calls=c.breaker_min_calls,
            failure_rate=c.breaker_failure_rate,
            open_s=c.breaker_reset,
        )
    )


def _compute_backend(
    settings: Settings, resolve: Callable[[str], bytes], breakers: Breakers
) -> LocalComputeBackend | HttpComputeBackend:
    """The backend ``SARTIQ_COMPUTE__BACKEND`` names; ``resolve`` reads its ``artifact:`` inputs."""
    c = settings.compute
    if c.backend == "http":
        return HttpComputeBackend(
            c.url,
            resolve=resolve,
            token=c.token,
            timeout_s=c.timeout,
            inline_limit=c.inline_limit,
            breakers=breakers,
            push=c.push,
        )
    return LocalComputeBackend(
        default_registry(),
        resolve=resolve,
        workers=c.local_workers,
        max_input_pixels=settings.media.max_input_pixels,
        nice=c.local_nice,
        idle=c.local_idle,
    )


async def _compute_providers(compute: ComputeBackend) -> dict[str, dict[str, str]]:
    """What serves each task type: CPU processors, or what the compute server's health says.

    Empty while the compute server cannot be reached.
    """
    if isinstance(compute, LocalComputeBackend):
        return {t.value: {"provider": "cpu"} for t in compute.task_types}
    if isinstance(compute, HttpComputeBackend):
        try:
            return (await compute.health()).providers
        except ComputeError:
            return {}
    return {}


def _evaluators(settings: Settings, breakers: Breakers) -> Evaluators:
    """The local evaluator, and the compute server's when compute runs over HTTP."""
    c = settings.compute
    providers: dict[str, Evaluator] = {
        "local": LocalEvaluator(
            max_pixels=settings.media.max_input_pixels, concurrency=c.local_workers
        )
    }
    if c.backend == "http":
        providers["remote"] = RemoteEvaluator(
            c.url,
            token=c.token,
            retry=RetryPolicy(budget_s=min(10.0, c.retry_budget)),
            breakers=breakers,
        )
    return Evaluators(providers)


def _tls(settings: Settings) -> TlsCredentials | None:
    """The listener's TLS credentials, when certificate files are configured.

    Raises:
        StartupError: only one of the certificate and the key is set, or they cannot be read.
    """
    s = settings.server
    if s.tls_cert_file is None and s.tls_key_file is None:
        if s.tls_client_ca_file is not None:
            raise StartupError("SARTIQ_SERVER__TLS_CLIENT_CA_FILE needs a certificate and key")
        return None
    if s.tls_cert_file is None or s.tls_key_file is None:
        raise StartupError("set both SARTIQ_SERVER__TLS_CERT_FILE and SARTIQ_SERVER__TLS_KEY_FILE")
    return TlsCredentials(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file)


def _rate_limiter(settings: Settings, db: AsyncEngine) -> RateLimiter | None:
    """Each organization's call rate: in memory (one process) or in the database (replicas)."""
    s = settings.server
    if not s.rate_limit:
        return None
    if is_sqlite(settings.database.url):
        return TokenBuckets(s.rate_limit, s.rate_burst)
    return DatabaseTokenBuckets(db, s.rate_limit, s.rate_burst)


def _live_limits(settings: Settings) -> LiveLimits:
    """The admission limits replicas on PostgreSQL count together in the database."""
    o = settings.orchestration
    return LiveLimits(
        per_organization=o.max_live_per_organization,
        total=o.max_queued_generations,
        retry_after=RetryDelay(o.retry_after_seconds, o.retry_after_jitter),
    )


def replica_name(server: ServerSettings) -> str:
    """The replica's identity among the replicas: configured, or host, port and worker.

    A configured port and worker index name the same replica across restarts, so a
    restarted one resumes its predecessor's generations at once; with port 0 (chosen at
    start) there is no such identity, and a random suffix keeps the name unique.
    """
    if server.replica_name is not None:
        return server.replica_name
    name = f"{socket.gethostname()[:60]}:{server.port}/{server.worker_index or 0}"
    if server.port == 0:
        name += f"-{uuid.uuid4().hex[:12]}"
    return name


def _prepare_directories(settings: Settings) -> None:
    """Create an SQLite database's directory if missing (the storage makes its own)."""
    url = make_url(settings.database.url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` so that a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class App:
    """The running service. ``async with App(settings) as app:`` serves on ``app.port``.

    Args:
        settings: every setting, parsed once by the caller.
        compute: a compute backend to use instead of the configured one (tests, benchmarks).
        fetcher: what fetches ``file://`` and ``http(s)://`` image inputs instead of the
            real fetcher (tests).
        artifacts: the artifact storage to use instead of the one ``storage.url`` names
            (tests: a disk that is slow at a chosen moment); the caller closes it.
        bus: the event bus to use instead of a new one (tests: one that loses a publish).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        compute: ComputeBackend | None = None,
        fetcher: InputFetcher | None = None,
        evaluators: Evaluators | None = None,
        artifacts: ArtifactStorage | None = None,
        bus: EventBus | None = None,
    ) -> None:
        self.settings = settings
        self._bus_override = bus
        self._artifacts_override = artifacts
        self._compute_override = compute
        self._fetcher_override = fetcher
        self._evaluators_override = evaluators
        self._evaluators: Evaluators | None = None
        self._fetcher: Fetcher | None = None
        self._db: AsyncEngine | None = None
        self._bus: EventBus | None = None
        self._writer: Writer | None = None
        self._listener: EventListener | None = None
        self._leases: Leases | None = None
        self._commands = Wakeups()  # what other replicas' notifications ask of the engine
        self._compute: ComputeBackend | None = None
        self._storage: ArtifactStorage | None = None  # built here, so closed here
        self._engine: Engine | None = None
        self._grpc: GrpcServer | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._tls: TlsCredentials | None = None
        self._lock: DatabaseLock | None = None
        self._stopped = False

    @property
    def port(self) -> int:
        """The port the gRPC server listens on."""
        if self._grpc is None:
            raise RuntimeError("the app is not started")
        return self._grpc.port

    @property
    def compute(self) -> ComputeBackend:
        """The compute backend in use (the one given, or the one the settings name)."""
        if self._compute is None:
            raise RuntimeError("the app is not started")
        return self._compute

    @property
    def writer_stats(self) -> WriterStats:
        """What the store's writer has done (transactions, statements, driver calls)."""
        if self._writer is None:
            raise RuntimeError("the app is not started")
        return self._writer.stats

    async def start(self) -> None:
        """Migrate the database, build everything, resume unfinished work, and serve."""
        s = self.settings
        # grpc logs raw metadata on some errors: its loggers clean records before any
        # handler sees them, wherever logging was configured (or not).
        install_redaction()
        _prepare_directories(s)
        if is_sqlite(s.database.url):
            self._lock = DatabaseLock.acquire(sqlite_path(s.database.url))
        await upgrade_to_head(s.database)
        self._db = create_engine(s.database)
        self._bus = self._bus_override or EventBus(s.server.watch_buffer)
        store = Store(create_session_factory(self._db), self._bus)
        lease = s.orchestration.lease_seconds
        name = replica_name(s.server)
        if is_sqlite(s.database.url):
            self._writer = Writer.for_sqlite(
                sqlite_path(s.database.url),
                self._bus,
                busy_timeout_ms=s.database.busy_timeout_ms,
                lease_seconds=lease,
                name=name,
            )
        else:
            self._leases = Leases(self._db, name=name, lease_seconds=lease)
            self._writer = Writer.for_async(
                self._db,
                self._bus,
                lease_seconds=lease,
                limits=_live_limits(s),
                leases=self._leases,
            )
            # Other replicas' commits wake this one's watchers, their releases and
            # cancels this one's engine (DESIGN §13).
            probe = s.database.listen_probe_interval
            self._listener = EventListener(
                asyncpg_connector(s.database.listen_url or s.database.url, timeout=max(probe, 5.0)),
                self._bus,
                origin=self._writer.owner,
                probe_interval=probe,
                commands=self._commands,
            )
            await self._listener.start()
        await self._writer.start()
        files = self._artifacts_override
        if files is None:
            files = self._storage = open_storage(s.storage, s.media)
        await files.start()
        swept = await files.sweep(max_age=s.media.stale_temp_after)
        if swept:
            log.info("removed %d unfinished uploads from %s", swept, files.location)
        breakers = _breakers(s)
        resolve = blocking_reader(files, asyncio.get_running_loop())
        self._compute = self._compute_override or _compute_backend(s, resolve, breakers)
        policy = ReferencePolicy.from_settings(s.media)
        fetcher = self._fetcher_override
        if fetcher is None:
            fetcher = self._fetcher = Fetcher.from_settings(s.media)
        inputs = InputPreparer(fetcher, files, policy, s.media)
        evaluators = self._evaluators = self._evaluators_override or _evaluators(s, breakers)
        self._engine = self._build_engine(
            store, self._writer, self._compute, files, inputs, evaluators
        )
        # A configured secret wins; otherwise the database's own, so that every replica
        # (and every restart) accepts the page tokens of the others.
        secret = s.server.page_token_secret
        tokens = PageTokens(
            secret.get_secret_value().encode()
            if secret is not None
            else await shared_secret(self._db, PAGE_TOKENS)
        )
        catalog = CatalogService(store, self._writer, files, media=s.media, tokens=tokens)
        services = Services(
            generations=GenerationService(
                store,
                self._engine,
                StrategyRegistry(
                    [
                        GenerateStrategy(),
                        EditingStrategy(policy),
                        RefineStrategy(policy),
                        VideoStrategy(policy),
                        BackgroundFixingStrategy(policy),
                        ImageAdjustingStrategy(policy),
                        FaceFixingStrategy(policy),
                    ]
                ),
                catalog,
                settings=s.orchestration,
                media=s.media,
                compute_backend=self._compute.name,
                compute_providers=functools.partial(_compute_providers, self._compute),
                evaluation_providers=evaluators.names,
                tokens=tokens,
            ),
            watcher=Watcher(store, heartbeat_interval=s.server.heartbeat_interval),
            artifacts=ArtifactService(store, self._writer, files, media=s.media),
            catalog=catalog,
        )
        self._tls = _tls(s)
        self._grpc = build_server(
            s.server,
            services,
            self._authenticator(),
            open_services=frozenset(s.auth.open_services),
            tls=self._tls,
            limits=_rate_limiter(s, self._db),
        )
        await self._grpc.server.start()
        await self._engine.start()
        await self._grpc.mark_serving()
        self._health_task = asyncio.create_task(
            self._report_compute_health(breakers, self._grpc), name="compute-health"
        )
        if s.server.port_file is not None:
            _write_atomically(s.server.port_file, f"{self._grpc.port}\n")
        log.info("serving on %s:%d", s.server.host, self._grpc.port)

    def reload_tls(self) -> None:
        """Read the TLS certificate files again at the next handshake (SIGHUP)."""
        if self._tls is not None:
            self._tls.reload()

    @staticmethod
    async def _report_compute_health(breakers: Breakers, grpc_server: GrpcServer) -> None:
        """Mirror the compute circuits on ``sartiq.compute``: NOT_SERVING while any is open."""
        changed = asyncio.Event()
        breakers.listen(lambda _: changed.set())
        while True:
            await changed.wait()
            changed.clear()
            healthy = breakers.healthy
            if not healthy:
                log.warning(
                    "compute calls suspended, circuit open: %s", ", ".join(breakers.open_operations)
                )
            await grpc_server.set_compute_health(healthy=healthy)

    def _build_engine(
        self,
        store: Store,
        writer: Writer,
        compute: ComputeBackend,
        files: ArtifactStorage,
        inputs: InputPreparer,
        evaluators: Evaluators,
    ) -> Engine:
        s = self.settings
        slots = asyncio.Semaphore(s.orchestration.max_tasks_in_flight)
        retry = RetryPolicy(budget_s=s.compute.retry_budget)
        runner = TaskRunner(
            compute,
            files,
            inputs,
            slots,
            settings=s.orchestration,
            retry=retry,
            store=store,
        )
        workflows = WorkflowRegistry(
            {
                GenerationType.BASE: BaseWorkflow(runner),
                GenerationType.AGENTIC: AgenticWorkflow(runner, evaluators, files),
            }
        )
        return Engine(
            store,
            writer,
            compute,
            workflows,
            # Enough workflows to keep every compute slot busy; the rest wait as data.
            max_running=2 * s.orchestration.max_tasks_in_flight,
            release_retry=release_policy(retry),
            leases=self._leases,
            wakeup=self._commands,
        )

    def _authenticator(self) -> Authenticator:
        s = self.settings
        verifier = JwtVerifier(s.auth) if s.auth.jwt_keys_file is not None else None
        auth = Authenticator(
            load_keys(s.auth),
            development_organization=s.server.default_organization,
            jwt_verifier=verifier,
        )
        if auth.development_mode:
            if not is_loopback(s.server.host) and not s.auth.allow_unauthenticated:
                raise StartupError(
                    f"refusing to serve on {s.server.host} without authentication: configure "
                    "SARTIQ_AUTH__API_KEYS(_FILE) or SARTIQ_AUTH__JWT_KEYS_FILE, or set "
                    "SARTIQ_AUTH__ALLOW_UNAUTHENTICATED=true to allow development mode there"
                )
            log.warning(
                "no API keys or JWT keys configured: development mode, every call is "
                "organization %r",
                s.server.default_organization,
            )
        return auth

    async def wait(self) -> None:
        """Block until the server stops."""
        if self._grpc is not None:
            await self._grpc.server.wait_for_termination()

    async def shutdown(self) -> None:
        """Stop accepting calls, end watch streams, drain, stop the engine, commit, close.

        Idempotent; parts never started are skipped.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._grpc is not None:
            await self._grpc.mark_not_serving()
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._bus is not None:
            # Watch streams never end on their own: close them now with UNAVAILABLE so
            # clients resume elsewhere instead of holding the drain for the whole grace.
            self._bus.close()
        if self._listener is not None:
            await self._listener.shutdown()
        if self._grpc is not None:
            await self._grpc.stop(self.settings.server.grace_period)
        if self._engine is not None:
            await self._engine.shutdown()
        if self._writer is not None:
            await self._writer.shutdown()  # what workflows queued is committed first
        if self._leases is not None:
            # Other replicas resume these at once instead of when the leases run out.
            released = await self._leases.release()
            if released:
                log.info("released %d unfinished generations to the other replicas", released)
        if self._compute is not None:
            await self._compute.aclose()  # its workers may read artifacts until then
        if self._storage is not None:
            await self._storage.aclose()
        if self._fetcher is not None:
            await self._fetcher.aclose()
        if self._evaluators is not None:
            await self._evaluators.aclose()
        if self._db is not None:
            await self._db.dispose()
        if self._lock is not None:
            self._lock.release()
        log.info("stopped")

    async def __aenter__(self) -> App:
        try:
            await self.start()
        except BaseException:
            await self.shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's reach, for good.

    Called once a process serves: what it holds then (modules, the app and its parts)
    lives as long as the process, yet a full collection would walk all of it every time
    (measured under load: pauses of the event loop up to about 180 ms; about half that
    after a freeze). Garbage made before the call is collected first.
    """
    gc.collect()
    gc.freeze()
