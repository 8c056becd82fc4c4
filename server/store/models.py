"""SQLAlchemy 2 typed models for every record of DESIGN §3."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    select,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship
from sqlalchemy.sql.selectable import ScalarSelect

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and always read back as aware UTC."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Normalise to naive UTC before writing."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach UTC when reading back."""
        return None if value is None else value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    """Return the current time, aware, in UTC."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base with the naming convention on its metadata."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Artifact(Base):
    """A content-addressed image or video: the facts of its bytes, shared by every owner."""

    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    mime_type: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    duration_s: Mapped[float | None] = mapped_column(Float)
    frame_count: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    uri: Mapped[str] = mapped_column(String(2048))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ArtifactOwner(Base):
    """Which organization may see an artifact: content is shared, visibility is not.

    The recipe is the owner's own (the same bytes may be one tenant's output and
    another's upload); unset for uploads and catalog images. ``created_at`` is when the
    organization first held the artifact: the create time it is shown, never the
    artifact row's (which would tell it when another tenant stored the same bytes).
    """

    __tablename__ = "artifact_owners"

    organization: Mapped[str] = mapped_column(String(128), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"), primary_key=True)
    recipe: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CatalogEntity(Base):
    """A subject, product or style of the catalog GENERATE loads."""

    __tablename__ = "catalog_entities"
    __table_args__ = (Index("ix_catalog_entities_org_kind", "organization", "kind", "id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    organization: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    lora_uri: Mapped[str] = mapped_column(String(2048), default="")
    lora_default_weight: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    reference_images: Mapped[list[CatalogReferenceImage]] = relationship(
        order_by="CatalogReferenceImage.position",
        cascade="all, delete-orphan",
        lazy="selectin",
    )


class CatalogReferenceImage(Base):
    """One reference image of a catalog entity, in order."""

    __tablename__ = "catalog_reference_images"

    entity_id: Mapped[str] = mapped_column(
        ForeignKey("catalog_entities.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    artifact_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    artifact: Mapped[Artifact] = relationship(lazy="joined")


class Generation(Base):
    """One request to produce outputs, tracked to the end."""

    __tablename__ = "generations"
    __table_args__ = (
        UniqueConstraint("organization", "request_id"),
        Index("ix_generations_list", "organization", "created_at", "id"),
        Index("ix_generations_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    organization: Mapped[str] = mapped_column(String(128))
    type: Mapped[str] = mapped_column(String(16))
    strategy: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32))
    request_id: Mapped[str | None] = mapped_column(String(128))
    fingerprint: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]]
    orchestration: Mapped[dict[str, Any]]
    # The JSON form of domain.model.ResourceError, when failed or cancelled.
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    deadline_at: Mapped[datetime | None]
    event_seq: Mapped[int] = mapped_column(Integer, default=0)
    # REFINE's record (the JSON form of domain.model.Refine); unset for other strategies.
    refinement: Mapped[dict[str, Any] | None]
    # Which replica runs the live generation, and until when its claim holds unless
    # renewed; unset once the generation is terminal.
    owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None]
    # Raised by every claim; a write of the generation commits only while the writer's
    # number is still the stored one (DESIGN §13: a paused old owner commits nothing).
    fence: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # A cancel recorded by a replica that does not run the generation, for its owner.
    cancel_requested_at: Mapped[datetime | None]
    # Loaded only where a response needs them (repository.WITH_LABELS).
    labels: Mapped[list[GenerationLabel]] = relationship(
        cascade="all, delete-orphan", lazy="raise", order_by="GenerationLabel.key"
    )
    # Joined eagerly (with their tasks and artifacts): a generation is one SELECT.
    predictions: Mapped[list[Prediction]] = relationship(
        cascade="all, delete-orphan", lazy="joined", order_by="Prediction.index"
    )


def _owned_since(sha256: Mapped[str | None], generation_id: Mapped[str]) -> ScalarSelect[datetime]:
    """When the generation's organization first held the artifact ``sha256`` (a subquery).

    Read with a prediction or attempt, so its output shows that organization's time.
    """
    organization = (
        select(Generation.organization)
        .where(Generation.id == generation_id)
        .correlate_except(Generation)
        .scalar_subquery()
    )
    return (
        select(ArtifactOwner.created_at)
        .where(ArtifactOwner.sha256 == sha256, ArtifactOwner.organization == organization)
        .correlate_except(ArtifactOwner)
        .scalar_subquery()
    )


class GenerationLabel(Base):
    """One key/value label of a generation, a row so lists can filter on it."""

    __tablename__ = "generation_labels"
    __table_args__ = (Index("ix_generation_labels_kv", "key", "value"),)

    generation_id: Mapped[str] = mapped_column(
        ForeignKey("generations.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class Prediction(Base):
    """One output slot of a generation."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("generation_id", "index"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))
    artifact_sha256: Mapped[str | None] = mapped_column(ForeignKey("artifacts.sha256"))
    score: Mapped[float | None] = mapped_column(Float)
    # How its artifact was produced (the JSON form of domain.model.Recipe).
    recipe: Mapped[dict[str, Any] | None]
    # The JSON form of domain.model.ResourceError, when failed or cancelled.
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    artifact: Mapped[Artifact | None] = relationship(lazy="joined")
    artifact_owned_at: Mapped[datetime | None] = column_property(
        _owned_since(artifact_sha256, generation_id)
    )
    # Chains run in order: tasks sort by (attempt number, step), never by time.
    tasks: Mapped[list[Task]] = relationship(
        lazy="joined", order_by="[Task.attempt_number, Task.step]"
    )
    # AGENTIC only (one extra SELECT per batch of predictions loaded).
    shot: Mapped[OrchestratedShot | None] = relationship(lazy="selectin")


class Task(Base):
    """One unit of work sent to compute."""

    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_generation", "generation_id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    prediction_id: Mapped[str] = mapped_column(ForeignKey("predictions.id", ondelete="CASCADE"))
    task_type: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    # Submissions to compute so far: a task compute lost (e.g. the local backend died
    # with the process) is submitted again as the next attempt.
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    compute_task_id: Mapped[str | None] = mapped_column(String(128))
    # Compute ids of the earlier attempts, oldest first.
    previous_compute_task_ids: Mapped[list[str]] = mapped_column(
        JSON, default=list, server_default=text("'[]'")
    )
    # AGENTIC attempt this task serves ("" under BASE), and its place in the chain.
    attempt_id: Mapped[str] = mapped_column(String(36), default="", server_default=text("''"))
    attempt_number: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    step: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    params: Mapped[dict[str, Any]]
    # The JSON form of domain.model.ResourceError, when failed or cancelled.
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class OrchestratedShot(Base):
    """AGENTIC only: the retry loop of one prediction."""

    __tablename__ = "orchestrated_shots"
    __table_args__ = (Index("ix_orchestrated_shots_generation", "generation_id"),)

    prediction_id: Mapped[str] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), primary_key=True
    )
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    max_attempts: Mapped[int] = mapped_column(Integer)
    min_confidence_score: Mapped[float] = mapped_column(Float)
    evaluation_provider: Mapped[str] = mapped_column(String(64))
    attempt_count: Mapped[int] = mapped_column(Integer, default=0)
    best_attempt: Mapped[int] = mapped_column(Integer, default=0)
    stop_reason: Mapped[str | None] = mapped_column(String(32))
    # The chain every attempt starts from: [{"task_type": ..., "params": {...}}, ...].
    plan: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    attempts: Mapped[list[Attempt]] = relationship(lazy="selectin", order_by="Attempt.number")


class Attempt(Base):
    """AGENTIC only: one try of a shot, with its evaluation."""

    __tablename__ = "attempts"
    __table_args__ = (
        UniqueConstraint("prediction_id", "number"),
        Index("ix_attempts_generation", "generation_id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    prediction_id: Mapped[str] = mapped_column(
        ForeignKey("orchestrated_shots.prediction_id", ondelete="CASCADE")
    )
    number: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32))
    seed: Mapped[int] = mapped_column(Integer)
    task_ids: Mapped[list[str]] = mapped_column(JSON)
    adjustments: Mapped[dict[str, Any]]
    adjustment_reason: Mapped[str] = mapped_column(Text, default="")
    # The JSON form of domain.model.Evaluation, once evaluated.
    evaluation: Mapped[dict[str, Any] | None]
    artifact_sha256: Mapped[str | None] = mapped_column(ForeignKey("artifacts.sha256"))
    # How its artifact was produced (the JSON form of domain.model.Recipe).
    recipe: Mapped[dict[str, Any] | None]
    # The JSON form of domain.model.ResourceError, when failed or cancelled.
    error: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    artifact: Mapped[Artifact | None] = relationship(lazy="joined")
    artifact_owned_at: Mapped[datetime | None] = column_property(
        _owned_since(artifact_sha256, generation_id)
    )


class GenerationEvent(Base):
    """Append-only log of a generation's state changes, gap-free per generation.

    ``cursor`` numbers the events of one organization 1, 2, 3... as they were committed,
    for WatchGenerations (unique per organization); the other copied columns are what
    its filters match.
    """

    __tablename__ = "generation_events"
    __table_args__ = (
        Index("ix_generation_events_org_cursor", "organization", "cursor", unique=True),
    )

    # (generation, sequence) is the key: no surrogate id, so a transaction's events
    # go to the database as one batched insert.
    generation_id: Mapped[str] = mapped_column(
        ForeignKey("generations.id", ondelete="CASCADE"), primary_key=True
    )
    sequence: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    time: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    terminal: Mapped[bool] = mapped_column(Boolean, default=False)
    # The event as the contract's GenerationEvent message; events written before it
    # was stored this way have their payload as JSON instead (server.domain.events).
    payload: Mapped[dict[str, Any] | None]
    payload_proto: Mapped[bytes | None] = mapped_column(LargeBinary)
    organization: Mapped[str] = mapped_column(String(128), server_default=text("''"))
    cursor: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    generation_status: Mapped[str] = mapped_column(String(32), server_default=text("''"))
    strategy: Mapped[str] = mapped_column(String(32), server_default=text("''"))
    type: Mapped[str] = mapped_column(String(16), server_default=text("''"))


class ServiceSecret(Base):
    """A random secret every server on this database shares (e.g. the page-token key).

    Created once, by the first server that needs it; never changed after. Whoever can read
    this table can read every record it protects, so keeping it here adds no exposure.
    """

    __tablename__ = "service_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LiveCount(Base):
    """Live (unfinished) generations of the whole deployment, for its admission limits.

    One row per organization (``scope`` "organization") and one for all of them (scope
    "deployment", organization ""). On PostgreSQL the writer changes them in the
    transaction that creates a generation (+1, refused past the limits) and in the one
    that ends it (-1), so they always equal the stored live generations. On SQLite the
    one process counts in memory and these rows are not kept.
    """

    __tablename__ = "live_counts"

    scope: Mapped[str] = mapped_column(String(16), primary_key=True)
    organization: Mapped[str] = mapped_column(String(128), primary_key=True)
    live: Mapped[int] = mapped_column(Integer)


class RateBucket(Base):
    """One organization's call-rate token bucket, shared by every replica (PostgreSQL).

    ``refilled_at`` is the database clock (seconds since the epoch) when ``tokens`` was
    last brought up to date; ``granted`` says whether the last call took a token (so one
    statement both takes and tells).
    """

    __tablename__ = "rate_buckets"

    organization: Mapped[str] = mapped_column(String(128), primary_key=True)
    tokens: Mapped[float] = mapped_column(Float)
    refilled_at: Mapped[float] = mapped_column(Float)
    granted: Mapped[bool] = mapped_column(Boolean)


class OrganizationCursor(Base):
    """The last event cursor given out per organization, taken inside each commit.

    On PostgreSQL the writer raises ``last_cursor`` in the transaction that inserts the
    events, and the row stays locked until that transaction commits: two replicas
    numbering one organization's events take turns, so numbers become visible in the
    order they were taken. SQLite (one writer per file) numbers from memory and leaves
    this table unused.
    """

    __tablename__ = "organization_cursors"

    organization: Mapped[str] = mapped_column(String(128), primary_key=True)
    last_cursor: Mapped[int] = mapped_column(Integer)
