"""Queries over the store, each scoped to the caller's organization where it applies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute, selectinload

from server.domain import events
from server.domain.enums import CatalogKind
from server.domain.filters import GenerationFilter
from server.domain.paging import Cursor
from server.domain.states import GENERATION_TERMINAL
from server.store.models import (
    Artifact,
    ArtifactOwner,
    CatalogEntity,
    Generation,
    GenerationEvent,
    GenerationLabel,
    utcnow,
)

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
    stmt = select(Generation.status, Generation.event_seq).where(
        Generation.id == generation_id, Generation.organization == org
    )
    row = (await session.execute(stmt)).one_or_none()
    return None if row is None else (row.status, row.event_seq)


async def lock_generation(session: AsyncSession, generation_id: str) -> Generation | None:
    """Load a generation for an internal change, locking its row until the transaction ends.

    The lock serialises writers of one generation on PostgreSQL, keeping event
    sequences gap-free; SQLite has a single writer already and ignores it.
    """
    stmt = select(Generation).where(Generation.id == generation_id).with_for_update(of=Generation)
    return (await session.execute(stmt)).unique().scalar_one_or_none()


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


async def non_terminal_generation_ids(session: AsyncSession) -> list[str]:
    """Every generation that has not reached a terminal state, oldest first."""
    terminal = [s.value for s in GENERATION_TERMINAL]
    stmt = (
        select(Generation.id)
        .where(Generation.status.not_in(terminal))
        .order_by(Generation.created_at, Generation.id)
    )
    return list((await session.execute(stmt)).scalars().all())


async def events_after(
    session: AsyncSession, generation_id: str, after: int, limit: int
) -> list[events.GenerationEvent]:
    """Stored events of a generation with sequence > ``after``, in order."""
    stmt = (
        select(GenerationEvent)
        .where(GenerationEvent.generation_id == generation_id, GenerationEvent.sequence > after)
        .order_by(GenerationEvent.sequence)
        .limit(limit)
    )
    rows = (await session.execute(stmt)).scalars().all()
    return [
        events.decode(r.generation_id, r.sequence, r.time, r.kind, r.terminal, r.payload)
        for r in rows
    ]


async def ensure_artifact(
    session: AsyncSession, sha256: str, make: Callable[[], Artifact]
) -> Artifact:
    """The stored artifact with this digest, adding the one ``make`` builds if there is none.

    Content addressing: the first record of a digest (and its recipe) is the one kept.
    """
    artifact = await session.get(Artifact, sha256)
    if artifact is None:
        artifact = make()
        session.add(artifact)
    return artifact


async def get_artifact(session: AsyncSession, sha256: str) -> Artifact | None:
    """The artifact with this digest, or None."""
    return await session.get(Artifact, sha256)


async def get_owned_artifact(
    session: AsyncSession, org: str, sha256: str
) -> tuple[Artifact, dict[str, Any] | None] | None:
    """The artifact with this digest and ``org``'s recipe for it.

    None when ``org`` does not own it, exactly as if it did not exist.
    """
    stmt = (
        select(Artifact, ArtifactOwner.recipe)
        .join(ArtifactOwner, ArtifactOwner.sha256 == Artifact.sha256)
        .where(Artifact.sha256 == sha256, ArtifactOwner.organization == org)
    )
    row = (await session.execute(stmt)).one_or_none()
    return None if row is None else (row[0], row[1])


async def own_artifact(
    session: AsyncSession, org: str, sha256: str, recipe: dict[str, Any] | None = None
) -> None:
    """Give ``org`` sight of the artifact, with its recipe when it is an output.

    Idempotent, also under concurrent writers; an owner without a recipe (it uploaded
    the bytes first) gains the recipe of a later output.
    """
    await session.flush()  # the artifact row this one refers to goes first
    values = {"organization": org, "sha256": sha256, "recipe": recipe, "created_at": utcnow()}
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    module: Any = postgresql if dialect == "postgresql" else sqlite
    stmt = module.insert(ArtifactOwner).values(**values)
    if recipe is None:
        stmt = stmt.on_conflict_do_nothing()
    else:
        stmt = stmt.on_conflict_do_update(
            index_elements=[ArtifactOwner.organization, ArtifactOwner.sha256],
            set_={"recipe": func.coalesce(ArtifactOwner.recipe, stmt.excluded.recipe)},
        )
    await session.execute(stmt)


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
