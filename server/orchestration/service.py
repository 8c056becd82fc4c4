"""The generation service: create, read, list and cancel generations, independent of gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from server.config import MediaSettings, OrchestrationSettings
from server.domain.enums import (
    CatalogKind,
    GenerationStatus,
    GenerationType,
    PredictionStatus,
    Strategy,
    TaskType,
)
from server.domain.errors import (
    NotFoundError,
    Violations,
)
from server.domain.filters import GenerationFilter
from server.domain.ids import IdSource
from server.domain.limits import RetryDelay, organization_full, queue_full
from server.domain.model import Artifact, CatalogEntity, Generation, Orchestration, clone
from server.domain.paging import Cursor, PageTokens, paginate, query_key
from server.orchestration.adjust import MAX_PASSES
from server.orchestration.blueprint import build_generation, fingerprint
from server.orchestration.engine import Engine, Reservation
from server.orchestration.idempotency import CreatesInFlight, same_request
from server.orchestration.live import LiveGeneration
from server.store import mapping, repository
from server.store.sessions import Store
from server.store.writer import DuplicateKeyError
from server.strategies.base import (
    TASK_TYPES,
    EntityLookup,
    FieldLimit,
    Plan,
    PredictionOutput,
    StrategyRegistry,
)
from server.strategies.common import check_labels, validate_options
from server.strategies.inputs import CreateOptions

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# How long a cancel sent to a replica that does not run the generation waits for its owner.
CANCEL_WAIT_S = 5.0


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What this server runs now."""

    strategies: dict[Strategy, tuple[FieldLimit, ...]]
    task_types: dict[Strategy, tuple[TaskType, ...]]
    generation_types: tuple[GenerationType, ...]
    evaluation_providers: tuple[str, ...]
    compute_backend: str
    max_upload_bytes: int
    max_input_pixels: int
    # What serves each compute task type ("provider", and "model" and "pipeline" for
    # diffusion); empty when the compute backend cannot say now.
    task_providers: dict[str, dict[str, str]]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a list and the token of the next one ("" on the last)."""

    items: Sequence[Generation]
    next_page_token: str


class GenerationService:
    """Every generation use case; the API layer calls this and nothing below it."""

    def __init__(
        self,
        store: Store,
        engine: Engine,
        strategies: StrategyRegistry,
        catalog: EntityLookup,
        *,
        settings: OrchestrationSettings,
        media: MediaSettings,
        compute_backend: str,
        compute_providers: Callable[[], Awaitable[dict[str, dict[str, str]]]],
        evaluation_providers: tuple[str, ...],
        tokens: PageTokens,
    ) -> None:
        self._store = store
        self._engine = engine
        self._strategies = strategies
        self._lookups = _StoreLookups(catalog, store)
        self._settings = settings
        self._media = media
        self._compute_backend = compute_backend
        self._compute_providers = compute_providers
        self._providers = evaluation_providers
        self._tokens = tokens
        self._ids = IdSource()
        # Creates in flight by idempotency key: a concurrent duplicate waits for the first.
        self._creates = CreatesInFlight(self._stored)

    async def capabilities(self) -> Capabilities:
        """The strategies, orchestration types and limits this server runs now."""
        return Capabilities(
            strategies=self._strategies.available(),
            task_types=TASK_TYPES,
            generation_types=self._engine.workflows.types,
            evaluation_providers=self._providers,
            compute_backend=self._compute_backend,
            max_upload_bytes=self._media.max_upload_bytes,
            max_input_pixels=self._media.max_input_pixels,
            task_providers=await self._compute_providers(),
        )

    async def create(
        self, org: str, strategy: Strategy, options: CreateOptions, raw: Any
    ) -> Generation:
        """Validate, record and start a generation; returns it in PENDING once it is durable.

        Raises:
            InvalidArgumentError: every offending field, at once.
            NotFoundError: a referenced catalog entity, prediction or artifact does not exist.
            FailedPreconditionError: a referenced prediction has not completed.
            AlreadyExistsError: the request_id was used for a different request.
            ResourceExhaustedError: too many generations are in progress.
            UnimplementedError: the strategy or orchestration type is not available yet.
        """
        handler = self._strategies.get(strategy)
        v = Violations()
        orchestration = validate_options(options, v, self._providers)
        params = handler.normalize(raw, v, agentic=orchestration.type is GenerationType.AGENTIC)
        v.raise_if_any()
        self._engine.workflows.get(orchestration.type)
        digest = fingerprint(strategy, options, params)
        if options.validate_only:
            plan = await handler.plan(self._lookups, org, params)
            self._check_budget(orchestration, plan)
            return build_generation(
                self._ids, org, strategy, options, orchestration, params, plan, digest, preview=True
            )
        key = (org, options.request_id)
        creating: asyncio.Future[Generation] | None = None
        if options.request_id:
            claimed = await self._creates.claim(key, digest)
            if isinstance(claimed, Generation):
                return claimed  # a retry: it takes no slot of its own
            creating = claimed
        try:
            # The slot is held from here until the workflow is launched (or the create
            # fails): creates still on their way to the commit count against the limits.
            with self._admit(org):
                plan = await handler.plan(self._lookups, org, params)
                self._check_budget(orchestration, plan)
                generation = build_generation(
                    self._ids, org, strategy, options, orchestration, params, plan, digest
                )
                snapshot = await self._record(key, generation)
        except BaseException as exc:
            if creating is not None:
                self._creates.settle(key, creating, error=exc)
            raise
        if creating is not None:
            self._creates.settle(key, creating, result=snapshot)
        return snapshot

    def _check_budget(self, orchestration: Orchestration, plan: Plan) -> None:
        """Refuse an AGENTIC request that could cause more compute tasks than allowed.

        The bound is predictions x max_attempts x (the longest planned chain + the
        corrective passes a retry may add).

        Raises:
            InvalidArgumentError: naming max_attempts (and batch_size when it counts).
        """
        agentic = orchestration.agentic
        if orchestration.type is not GenerationType.AGENTIC or agentic is None:
            return
        chain = max(len(p.tasks) for p in plan.predictions) + MAX_PASSES
        count = len(plan.predictions)
        worst = count * agentic.max_attempts * chain
        limit = self._settings.max_agentic_tasks
        if worst <= limit:
            return
        message = (
            f"could cause up to {worst} compute tasks ({count} predictions x "
            f"{agentic.max_attempts} attempts x {chain} tasks per attempt); this server "
            f"allows {limit} per generation"
        )
        v = Violations()
        v.add("orchestration.agentic.max_attempts", message)
        if count > 1:
            v.add("params.batch_size", message)
        v.raise_if_any()

    async def _record(self, key: tuple[str, str], generation: Generation) -> Generation:
        """Commit a new generation, then start its workflow; the PENDING snapshot.

        Where replicas share the database and this one has no workflow free, the
        generation is committed held by no replica: it joins the deployment's line, from
        which replicas with room take generations, the organizations in turn.
        """
        shared_line = self._engine.shared and not self._engine.has_room()
        live = LiveGeneration(generation, self._engine.writer, new=True, held=not shared_line)
        snapshot = live.recorder.created()
        try:
            await live.flush()
        except DuplicateKeyError:
            # Another process committed this request_id first: answer as the second.
            # (The deployment's counts are checked once the rows are written, so a copy
            # of a request committed elsewhere fails here, never as refused.)
            existing = await self._stored(key, generation.fingerprint)
            if existing is None:
                raise
            return existing
        if shared_line:
            position = await self._engine.join_line(generation.id)
            return clone(snapshot, queue_position=position) if position else snapshot
        # Found without walking the line: a new generation waits at its end.
        position = self._engine.launch(live)
        if position:  # a new record: the snapshot's encoding was made already
            snapshot = clone(snapshot, queue_position=position)
        return snapshot

    async def _stored(self, key: tuple[str, str], digest: str) -> Generation | None:
        org, request_id = key
        async with self._store.read() as session:
            found = await repository.request_fingerprint(session, org, request_id)
            if found is None:
                return None
            row = await repository.get_generation(session, org, found[0])
            if row is None:
                return None
            return same_request(mapping.generation(row), request_id, digest)

    def _admit(self, org: str) -> Reservation:
        """A slot for one more live generation of ``org``; release it, or launch and release.

        Every live generation of this process has a workflow in its engine, and every
        create on its way to the commit holds a reservation there, so the counts need no
        query and concurrent creates cannot all pass the same check. With one process
        (SQLite) that is the whole check. Replicas on PostgreSQL check here first (what
        this process holds is part of what the deployment holds), then the writer
        checks the deployment's counts in the create's own transaction.

        Raises:
            ResourceExhaustedError: the queue bound or the organization's limit is reached.
        """
        retry = RetryDelay(self._settings.retry_after_seconds, self._settings.retry_after_jitter)
        if self._engine.in_flight >= self._settings.max_queued_generations:
            raise queue_full(retry)
        limit = self._settings.max_live_per_organization
        if self._engine.live_count(org) >= limit:
            raise organization_full(limit, retry)
        return self._engine.reserve(org)

    async def get(self, org: str, generation_id: str) -> Generation:
        """The generation with its predictions and tasks, as committed.

        Raises:
            NotFoundError: unknown id, or another organization's.
        """
        async with self._store.read() as session:
            row = await repository.get_generation(session, org, generation_id)
            if row is None:
                raise generation_not_found(generation_id)
            generation = mapping.generation(row)
        generation.queue_position = await self._engine.position(generation)
        return generation

    async def list(self, org: str, flt: GenerationFilter, page_size: int, page_token: str) -> Page:
        """One page of the organization's generations, newest first.

        Raises:
            InvalidArgumentError: every fault at once: the filter's decoding problems, bad
                labels, a bad page size, a token not ours or from another filter.
        """
        v = Violations()
        v.extend(flt.problems)
        check_labels(v, flt.labels, "filter.labels")

        async def fetch(cursor: Cursor | None, limit: int) -> Sequence[Generation]:
            async with self._store.read() as session:
                rows = await repository.list_generations(session, org, flt, cursor, limit)
                return [mapping.generation(row, with_tasks=False) for row in rows]

        items, token = await paginate(
            fetch,
            page_size=page_size,
            page_token=page_token,
            key=_filter_key(flt),
            tokens=self._tokens,
            default_size=DEFAULT_PAGE_SIZE,
            max_size=MAX_PAGE_SIZE,
            violations=v,
        )
        return Page(items, token)

    async def cancel(self, org: str, generation_id: str) -> Generation:
        """Ask a generation to stop; a finished one is returned unchanged.

        Raises:
            NotFoundError: unknown id, or another organization's.
        """
        live = self._engine.get(org, generation_id)
        if live is None:
            stored = await self.get(org, generation_id)
            if stored.done:
                return stored
            if self._engine.shared:
                return await self._cancel_elsewhere(org, generation_id)
            # Unfinished but run by no workflow here (its run just ended, or the
            # process that held it is gone): take it over so the cancel is carried out.
            live = LiveGeneration(stored, self._engine.writer)
            self._engine.launch(live)
        return await self._engine.cancel(live)

    async def _cancel_elsewhere(self, org: str, generation_id: str) -> Generation:
        """Cancel a generation another replica runs: recorded for it, answered once it acted.

        The answer is the generation once its owner has recorded CANCELLING (or it has
        ended), normally within milliseconds; if the owner died, another replica takes
        the generation over when its lease runs out and carries the cancel out then, so
        after ``CANCEL_WAIT_S`` the answer is the generation as it stands.
        """
        cancelling = await self._engine.cancel_elsewhere(org, generation_id)
        if cancelling is not None:
            return cancelling
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT_S
        delay = 0.01
        while True:
            stored = await self.get(org, generation_id)
            if stored.done or stored.status is GenerationStatus.CANCELLING:
                return stored
            if loop.time() >= deadline:
                return stored
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)


class _StoreLookups:
    """What strategies look up at create: catalog entities (cached), earlier outputs, artifacts."""

    def __init__(self, catalog: EntityLookup, store: Store) -> None:
        self._catalog = catalog
        self._store = store

    async def entity(self, org: str, kind: CatalogKind, entity_id: str) -> CatalogEntity | None:
        """The catalog entity, or None."""
        return await self._catalog.entity(org, kind, entity_id)

    async def prediction_output(self, org: str, prediction_id: str) -> PredictionOutput | None:
        """An earlier prediction of ``org``'s: its status and output, or None."""
        async with self._store.read() as session:
            found = await repository.get_prediction_output(session, org, prediction_id)
        if found is None:
            return None
        status, artifact = found
        output = None if artifact is None else mapping.artifact(artifact)
        return PredictionOutput(PredictionStatus(status), output)

    async def artifact(self, org: str, sha256: str) -> Artifact | None:
        """An artifact ``org`` owns, or None."""
        async with self._store.read() as session:
            owned = await repository.get_owned_artifact(session, org, sha256)
        return None if owned is None else mapping.artifact(*owned)


def generation_not_found(generation_id: str) -> NotFoundError:
    """The error for an unknown (or another tenant's) generation id."""
    return NotFoundError.of("generation", {"generation_id": generation_id})


def _filter_key(flt: GenerationFilter) -> str:
    return query_key(
        "generations",
        sorted(flt.statuses),
        sorted(flt.strategies),
        sorted(flt.types),
        sorted(flt.labels.items()),
        flt.created_after,
        flt.created_before,
    )
