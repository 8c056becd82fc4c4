"""Queries over the store, each scoped to the caller's organization where it applies."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute, selectinload

from server.contract import encode as contract
from server.domain import events
from server.domain.enums import CatalogKind, GenerationStatus, GenerationType, Strategy
from server.domain.filters import GenerationFilter
from server.domain.paging import Cursor
from server.store.models import (
    Artifact,
    ArtifactOwner,
    CatalogEntity,
    Generation,
    GenerationLabel,
    Prediction,
)
from server.store.rows import EVENTS, GENERATIONS, LABELS

WITH_LABELS = selectinload(Generation.labels)


async def get_generation(
    session: AsyncSession, org: str, generation_id: str, *, for_update: bool = False
) -> Generation | None:
    """Load a generation with its predictions, tasks and artifacts, or None.

    ``for_update`` locks the row for the rest of the transaction (PostgreSQL).
    """
    stmt = (
        select(Generation)
        .where(Generation.id == generation_id, Generation.organization == org)
        .options(WITH_LABELS)
    )
    if for_update:
        stmt = stmt.with_for_update(of=Generation)
    return (await session.execute(stmt)).unique().scalar_one_or_none()


async def generation_position(
    session: AsyncSession, org: str, generation_id: str
) -> tuple[str, int] | None:
    """The generation's status and last event sequence, without loading its tree."""
    stmt = select(GENERATIONS.c.status, GENERATIONS.c.event_seq).where(
        GENERATIONS.c.id == generation_id, GENERATIONS.c.organization == org
    )
    row = (await session.execute(stmt)).one_or_none()
    return None if row is None else (row.status, row.event_seq)


async def request_fingerprint(
    session: AsyncSession, org: str, request_id: str
) -> tuple[str, str] | None:
    """The (id, fingerprint) of the generation an idempotency key created, or None."""
    stmt = select(GENERATIONS.c.id, GENERATIONS.c.fingerprint).where(
        GENERATIONS.c.organization == org, GENERATIONS.c.request_id == request_id
    )
    row = (await session.execute(stmt)).one_or_none()
    return None if row is None else (row.id, row.fingerprint)


async def generations_by_id(session: AsyncSession, ids: Sequence[str]) -> Sequence[Generation]:
    """Whole generation trees (labels included) for ``ids``, in that order."""
    found: dict[str, Generation] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        stmt = select(Generation).where(Generation.id.in_(chunk)).options(WITH_LABELS)
        for row in (await session.execute(stmt)).unique().scalars():
            found[row.id] = row
    return [found[i] for i in ids if i in found]


async def get_generation_by_request_id(
    session: AsyncSession, org: str, request_id: str
) -> Generation | None:
    """The generation an idempotency key already created, or None."""
    stmt = (
        select(Generation)
        .where(Generation.organization == org, Generation.request_id == request_id)
        .options(WITH_LABELS)
    )
    return (await session.execute(stmt)).unique().scalar_one_or_none()


async def list_generations(
    session: AsyncSession,
    org: str,
    flt: GenerationFilter,
    cursor: Cursor | None,
    limit: int,
) -> Sequence[Generation]:
    """One page of the organization's generations, newest first."""
    stmt = select(Generation).where(Generation.organization == org).options(WITH_LABELS)
    if flt.statuses:
        stmt = stmt.where(Generation.status.in_(flt.statuses))
    if flt.strategies:
        stmt = stmt.where(Generation.strategy.in_(flt.strategies))
    if flt.types:
        stmt = stmt.where(Generation.type.in_(flt.types))
    for key, value in sorted(flt.labels.items()):
        stmt = stmt.where(
            exists().where(
                GenerationLabel.generation_id == Generation.id,
                GenerationLabel.key == key,
                GenerationLabel.value == value,
            )
        )
    if flt.created_after is not None:
        stmt = stmt.where(Generation.created_at >= flt.created_after)
    if flt.created_before is not None:
        stmt = stmt.where(Generation.created_at < flt.created_before)
    if cursor is not None:
        stmt = stmt.where(_before(Generation.created_at, Generation.id, cursor))
    stmt = stmt.order_by(Generation.created_at.desc(), Generation.id.desc()).limit(limit)
    return (await session.execute(stmt)).unique().scalars().all()


async def events_after(
    session: AsyncSession, generation_id: str, after: int, limit: int
) -> list[events.GenerationEvent]:
    """Stored events of a generation with sequence > ``after``, in order."""
    stmt = (
        select(EVENTS)
        .where(EVENTS.c.generation_id == generation_id, EVENTS.c.sequence > after)
        .order_by(EVENTS.c.sequence)
        .limit(limit)
    )
    return [_event(row) for row in await session.execute(stmt)]


def _event(row: Any) -> events.GenerationEvent:
    if row.payload_proto is not None:
        event = contract.decode_event(row.payload_proto)
    else:  # written before events were stored as the contract's message
        event = events.decode(
            row.generation_id, row.sequence, row.time, row.kind, row.terminal, row.payload
        )
    event.organization = row.organization
    event.cursor = row.cursor
    event.status = GenerationStatus(row.generation_status) if row.generation_status else None
    event.strategy = Strategy(row.strategy) if row.strategy else None
    event.type = GenerationType(row.type) if row.type else None
    return event


async def organization_events_after(
    session: AsyncSession, org: str, flt: GenerationFilter, after: int, limit: int
) -> tuple[list[events.GenerationEvent], int]:
    """Stored events of ``org`` with cursor > ``after`` that match ``flt``, in cursor order.

    Also returns the cursor scanned up to, so a caller whose filter matched nothing can
    still move on. The last cursor is read first and the events only up to it: on
    PostgreSQL each statement sees the commits made before it started, and a number is
    never visible before the smaller ones (the writer takes them in turn, see
    ``server.store.writer``), so every event up to that cursor is there to be read. Read
    the other way round, an event committed between the two statements would be skipped.
    """
    top = await latest_cursor(session, org)
    if top <= after:
        return [], after
    stmt = select(EVENTS).where(
        EVENTS.c.organization == org, EVENTS.c.cursor > after, EVENTS.c.cursor <= top
    )
    if flt.statuses:
        stmt = stmt.where(EVENTS.c.generation_status.in_(flt.statuses))
    if flt.strategies:
        stmt = stmt.where(EVENTS.c.strategy.in_(flt.strategies))
    if flt.types:
        stmt = stmt.where(EVENTS.c.type.in_(flt.types))
    for key, value in sorted(flt.labels.items()):
        stmt = stmt.where(
            exists().where(
                LABELS.c.generation_id == EVENTS.c.generation_id,
                LABELS.c.key == key,
                LABELS.c.value == value,
            )
        )
    if flt.created_after is not None or flt.created_before is not None:
        created = select(GENERATIONS.c.id).where(GENERATIONS.c.id == EVENTS.c.generation_id)
        if flt.created_after is not None:
            created = created.where(GENERATIONS.c.created_at >= flt.created_after)
        if flt.created_before is not None:
            created = created.where(GENERATIONS.c.created_at < flt.created_before)
        stmt = stmt.where(exists(created))
    stmt = stmt.order_by(EVENTS.c.cursor).limit(limit)
    found = [_event(row) for row in await session.execute(stmt)]
    if len(found) == limit:
        return found, found[-1].cursor
    return found, top


async def latest_cursor(session: AsyncSession, org: str) -> int:
    """The cursor of the organization's newest stored event (0 when it has none)."""
    top = select(func.max(EVENTS.c.cursor)).where(EVENTS.c.organization == org)
    return int((await session.execute(top)).scalar() or 0)


async def get_artifact(session: AsyncSession, sha256: str) -> Artifact | None:
    """The artifact with this digest, or None."""
    return await session.get(Artifact, sha256)


async def get_owned_artifact(
    session: AsyncSession, org: str, sha256: str
) -> tuple[Artifact, dict[str, Any] | None, datetime] | None:
    """The artifact with this digest, ``org``'s recipe for it and when ``org`` first held it.

    None when ``org`` does not own it, exactly as if it did not exist.
    """
    stmt = (
        select(Artifact, ArtifactOwner.recipe, ArtifactOwner.created_at)
        .join(ArtifactOwner, ArtifactOwner.sha256 == Artifact.sha256)
        .where(Artifact.sha256 == sha256, ArtifactOwner.organization == org)
    )
    row = (await session.execute(stmt)).one_or_none()
    return None if row is None else (row[0], row[1], row[2])


async def owned_since(session: AsyncSession, org: str, sha256: str) -> datetime | None:
    """When ``org`` first held the artifact ``sha256``, or None if it does not hold it."""
    stmt = select(ArtifactOwner.created_at).where(
        ArtifactOwner.organization == org, ArtifactOwner.sha256 == sha256
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def get_prediction_output(
    session: AsyncSession, org: str, prediction_id: str
) -> tuple[str, Artifact | None] | None:
    """A prediction of ``org``'s generations: its status and output artifact, or None."""
    stmt = (
        select(Prediction.status, Artifact)
        .join(Generation, Generation.id == Prediction.generation_id)
        .outerjoin(Artifact, Artifact.sha256 == Prediction.artifact_sha256)
        .where(Prediction.id == prediction_id, Generation.organization == org)
    )
    row = (await session.execute(stmt)).one_or_none()
    return None if row is None else (row[0], row[1])


async def get_entity(
    session: AsyncSession, org: str, kind: CatalogKind, entity_id: str
) -> CatalogEntity | None:
    """A catalog entity of the organization, or None."""
    stmt = select(CatalogEntity).where(
        CatalogEntity.id == entity_id,
        CatalogEntity.organization == org,
        CatalogEntity.kind == kind.value,
    )
    return (await session.execute(stmt)).unique().scalar_one_or_none()


async def list_entities(
    session: AsyncSession, org: str, kind: CatalogKind, cursor: Cursor | None, limit: int
) -> Sequence[CatalogEntity]:
    """One page of catalog entities, newest first."""
    stmt = select(CatalogEntity).where(
        CatalogEntity.organization == org, CatalogEntity.kind == kind.value
    )
    if cursor is not None:
        stmt = stmt.where(_before(CatalogEntity.created_at, CatalogEntity.id, cursor))
    stmt = stmt.order_by(CatalogEntity.created_at.desc(), CatalogEntity.id.desc()).limit(limit)
    return (await session.execute(stmt)).unique().scalars().all()


def _before(
    created_at: InstrumentedAttribute[datetime], id_: InstrumentedAttribute[str], cursor: Cursor
) -> ColumnElement[bool]:
    """Rows after ``cursor`` in (created_at desc, id desc) order."""
    return or_(
        created_at < cursor.created_at,
        and_(created_at == cursor.created_at, id_ < cursor.id),
    )
