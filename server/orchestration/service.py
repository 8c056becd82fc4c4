"""The generation service: create, read, list and cancel generations, independent of gRPC."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError

from server.config import MediaSettings, OrchestrationSettings
from server.domain.enums import (
    GenerationStatus,
    GenerationType,
    PredictionStatus,
    Strategy,
    TaskType,
)
from server.domain.errors import (
    AlreadyExistsError,
    NotFoundError,
    ResourceExhaustedError,
    UnimplementedError,
    Violations,
)
from server.domain.filters import GenerationFilter
from server.domain.model import Generation, Orchestration, to_json
from server.domain.paging import Cursor, paginate, query_key
from server.domain.states import GENERATION_TERMINAL
from server.orchestration.engine import Engine
from server.store import mapping, repository
from server.store import models as rows
from server.store.db import AsyncSession
from server.store.models import utcnow
from server.store.uow import Store
from server.strategies.base import TASK_TYPES, FieldLimit, PlannedTask, StrategyRegistry
from server.strategies.common import check_labels, validate_options
from server.strategies.inputs import CreateOptions

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100


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
        *,
        settings: OrchestrationSettings,
        media: MediaSettings,
        compute_backend: str,
    ) -> None:
        self._store = store
        self._engine = engine
        self._strategies = strategies
        self._settings = settings
        self._media = media
        self._compute_backend = compute_backend

    def capabilities(self) -> Capabilities:
        """The strategies, orchestration types and limits this server runs now."""
        return Capabilities(
            strategies=self._strategies.available(),
            task_types=TASK_TYPES,
            generation_types=(GenerationType.BASE,),
            evaluation_providers=(),
            compute_backend=self._compute_backend,
            max_upload_bytes=self._media.max_upload_bytes,
            max_input_pixels=self._media.max_input_pixels,
        )

    async def create(
        self, org: str, strategy: Strategy, options: CreateOptions, raw: Any
    ) -> Generation:
        """Validate, record and start a generation; returns it in PENDING at once.

        Raises:
            InvalidArgumentError: every offending field, at once.
            NotFoundError: a referenced catalog entity does not exist.
            AlreadyExistsError: the request_id was used for a different request.
            ResourceExhaustedError: too many generations are queued.
            UnimplementedError: the strategy or orchestration type is not available yet.
        """
        handler = self._strategies.get(strategy)
        v = Violations()
        orchestration = validate_options(options, v)
        params = handler.normalize(raw, v)
        v.raise_if_any()
        if orchestration.type is GenerationType.AGENTIC:
            raise UnimplementedError(
                "AGENTIC orchestration is not available on this server yet; use BASE",
                feature="GENERATION_TYPE_AGENTIC",
            )
        fingerprint = _fingerprint(strategy, options, params)
        if options.validate_only:
            async with self._store.read() as session:
                planned = await handler.plan(session, org, params)
            row = _build(org, strategy, options, orchestration, params, planned, fingerprint, "")
            return mapping.generation(row)
        try:
            async with self._store.write() as uow:
                existing = await self._existing(uow.session, org, options.request_id, fingerprint)
                if existing is not None:
                    return existing
                self._admit()
                planned = await handler.plan(uow.session, org, params)
                row = _build(
                    org,
                    strategy,
                    options,
                    orchestration,
                    params,
                    planned,
                    fingerprint,
                    str(uuid.uuid4()),
                )
                uow.session.add(row)
                uow.created(row)
                created = mapping.generation(row)
        except IntegrityError:
            # Another create with this request_id committed first (PostgreSQL, several
            # writers): answer as if this call had come second.
            async with self._store.read() as session:
                existing = await self._existing(session, org, options.request_id, fingerprint)
            if existing is None:
                raise
            return existing
        self._engine.submit(created.id)
        return created

    @staticmethod
    async def _existing(
        session: AsyncSession, org: str, request_id: str, fingerprint: str
    ) -> Generation | None:
        """The generation ``request_id`` created already, or None.

        Raises:
            AlreadyExistsError: it was created by a different request.
        """
        if not request_id:
            return None
        row = await repository.get_generation_by_request_id(session, org, request_id)
        if row is None:
            return None
        if row.fingerprint != fingerprint:
            raise AlreadyExistsError(
                "request_id was used for a different request", request_id=request_id
            )
        return mapping.generation(row)

    def _admit(self) -> None:
        # Every live generation has a workflow in this process's engine, so its count
        # is the queue length without a query.
        if self._engine.in_flight >= self._settings.max_queued_generations:
            raise ResourceExhaustedError(
                "too many generations are in progress; retry later",
                retry_after=self._settings.retry_after_seconds,
            )

    async def get(self, org: str, generation_id: str) -> Generation:
        """The generation with its predictions and tasks.

        Raises:
            NotFoundError: unknown id, or another organization's.
        """
        async with self._store.read() as session:
            row = await repository.get_generation(session, org, generation_id)
            if row is None:
                raise generation_not_found(generation_id)
            return mapping.generation(row)

    async def list(self, org: str, flt: GenerationFilter, page_size: int, page_token: str) -> Page:
        """One page of the organization's generations, newest first.

        Raises:
            InvalidArgumentError: bad labels or page size, or a token from another filter.
        """
        v = Violations()
        check_labels(v, flt.labels, "filter.labels")
        v.raise_if_any()

        async def fetch(cursor: Cursor | None, limit: int) -> Sequence[Generation]:
            async with self._store.read() as session:
                rows = await repository.list_generations(session, org, flt, cursor, limit)
                return [mapping.generation(row, with_tasks=False) for row in rows]

        items, token = await paginate(
            fetch,
            page_size=page_size,
            page_token=page_token,
            key=_filter_key(flt),
            default_size=DEFAULT_PAGE_SIZE,
            max_size=MAX_PAGE_SIZE,
        )
        return Page(items, token)

    async def cancel(self, org: str, generation_id: str) -> Generation:
        """Ask a generation to stop; a terminal one is returned unchanged.

        Raises:
            NotFoundError: unknown id, or another organization's.
        """
        async with self._store.write() as uow:
            row = await repository.get_generation(uow.session, org, generation_id, for_update=True)
            if row is None:
                raise generation_not_found(generation_id)
            status = GenerationStatus(row.status)
            if status in GENERATION_TERMINAL or status is GenerationStatus.CANCELLING:
                return mapping.generation(row)
            uow.set_generation_status(row, GenerationStatus.CANCELLING)
            cancelling = mapping.generation(row)
        self._engine.request_cancel(generation_id)
        return cancelling


def generation_not_found(generation_id: str) -> NotFoundError:
    """The error for an unknown (or another tenant's) generation id."""
    return NotFoundError.of("generation", {"generation_id": generation_id})


def _build(
    org: str,
    strategy: Strategy,
    options: CreateOptions,
    orchestration: Orchestration,
    params: dict[str, Any],
    planned: list[PlannedTask],
    fingerprint: str,
    generation_id: str,
) -> rows.Generation:
    """The rows of a new generation; with an empty id, a preview that is never stored."""
    now = utcnow()
    generation = rows.Generation(
        id=generation_id,
        organization=org,
        type=orchestration.type.value,
        strategy=strategy.value,
        status=GenerationStatus.PENDING.value,
        request_id=options.request_id or None,
        fingerprint=fingerprint,
        params=params,
        orchestration=to_json(orchestration),
        created_at=now,
        deadline_at=now + timedelta(seconds=options.timeout_s) if options.timeout_s else None,
        event_seq=0,
        labels=[rows.GenerationLabel(key=k, value=v) for k, v in sorted(options.labels.items())],
        predictions=[],
    )
    for index, plan in enumerate(planned):
        prediction_id = str(uuid.uuid4()) if generation_id else ""
        task = rows.Task(
            id=str(uuid.uuid4()) if generation_id else "",
            generation_id=generation_id,
            prediction_id=prediction_id,
            task_type=plan.task_type.value,
            status="PENDING",
            progress=0.0,
            attempt=1,
            previous_compute_task_ids=[],
            attempt_id="",
            attempt_number=1,
            step=0,
            params=plan.params,
            created_at=now,
        )
        generation.predictions.append(
            rows.Prediction(
                id=prediction_id,
                generation_id=generation_id,
                index=index,
                seed=plan.seed,
                status=PredictionStatus.PENDING.value,
                created_at=now,
                tasks=[task],
                artifact=None,
                shot=None,
            )
        )
    return generation


def _fingerprint(strategy: Strategy, options: CreateOptions, params: dict[str, Any]) -> str:
    body = {
        "strategy": strategy.value,
        "params": params,
        "type": (options.type or GenerationType.BASE).value,
        "agentic": asdict(options.agentic) if options.agentic else None,
        "labels": options.labels,
        "timeout": options.timeout_s,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


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
