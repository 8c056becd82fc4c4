"""Image inputs of the strategies: checked at validation, resolved at create.

A request names each image by reference (see ``server.media.references``). Validation
checks the syntax and the server's policy; planning then resolves what can be resolved
at once: an earlier prediction becomes its output artifact, an artifact is checked to be
the caller's, a file to exist. ``http(s)`` images are fetched just before their task runs.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from server.domain.enums import CatalogKind, PredictionStatus, TaskType
from server.domain.errors import FailedPreconditionError, NotFoundError, Violations
from server.domain.model import Artifact, CatalogEntity
from server.media.references import (
    ArtifactRef,
    FileRef,
    PredictionRef,
    Reference,
    ReferencePolicy,
    UrlRef,
    format_reference,
    parse_reference,
)
from server.strategies.base import Lookups, Plan, PlannedPrediction, PlannedTask
from server.strategies.common import MAX_SEED
from server.strategies.entities import find_entities


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    """An image input after create: what the task reads, and the artifact when known."""

    reference: str  # ``artifact:<sha256>``, or a ``file://`` / ``http(s)://`` to fetch later
    artifact: Artifact | None = None


def check_image(
    v: Violations, policy: ReferencePolicy, field: str, text: str, *, required: bool
) -> None:
    """Record a violation unless ``text`` is a valid image reference (or empty and optional)."""
    if not text:
        if required:
            v.add(field, "is required: an image reference")
        return
    parse_reference(text, field, v, policy)


async def resolve_images(
    lookups: Lookups, org: str, policy: ReferencePolicy, images: dict[str, str]
) -> dict[str, ResolvedImage]:
    """Resolve the image references of a validated request, by field path.

    Empty references are skipped.

    Raises:
        NotFoundError: every ``prediction:``/``artifact:`` reference to nothing ``org``
            can see, at once, by field path.
        FailedPreconditionError: a referenced prediction has not completed.
        InvalidArgumentError: a ``file://`` reference to no regular file.
    """
    found = await find_images(lookups, org, policy, images)
    found.raise_if_any()
    return found.resolved


async def resolve_inputs(
    lookups: Lookups,
    org: str,
    policy: ReferencePolicy,
    images: dict[str, str],
    params: dict[str, Any],
    entities: Sequence[tuple[str, CatalogKind]],
) -> tuple[dict[str, ResolvedImage], dict[str, CatalogEntity]]:
    """Resolve a request's images and load its catalog entities, checking both first.

    Raises:
        NotFoundError: every unknown image reference and entity id together, one
            metadata entry each (the contract's promise for NOT_FOUND).
        FailedPreconditionError: a referenced prediction has not completed.
        InvalidArgumentError: a ``file://`` reference to no regular file.
    """
    found = await find_images(lookups, org, policy, images)
    loaded, unknown = await find_entities(lookups, org, params, entities)
    what = "image"
    if unknown:
        what = "image or catalog entity" if found.missing else "catalog entity"
    found.missing.update(unknown)
    found.raise_if_any(what)
    return found.resolved, loaded


@dataclass(slots=True)
class FoundImages:
    """What resolving a request's images found: each fault is kept, none raised yet."""

    resolved: dict[str, ResolvedImage] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # field path -> the reference
    unready: FailedPreconditionError | None = None
    violations: Violations = field(default_factory=Violations)

    def raise_if_any(self, what: str = "image") -> None:
        """Raise the worst fault found: unknown ids, then unready inputs, then bad files.

        ``what`` names the unknown things in the NOT_FOUND message.

        Raises:
            NotFoundError: anything in ``missing``, every entry named.
            FailedPreconditionError: the first input that is not ready.
            InvalidArgumentError: the inputs only resolving revealed as bad.
        """
        if self.missing:
            raise NotFoundError.of(what, self.missing)
        if self.unready is not None:
            raise self.unready
        self.violations.raise_if_any()


async def find_images(
    lookups: Lookups, org: str, policy: ReferencePolicy, images: dict[str, str]
) -> FoundImages:
    """Resolve every non-empty image reference, by field path, collecting every fault."""
    found = FoundImages()
    for field_path, text in images.items():
        if not text:
            continue
        reference = parse_reference(text, field_path, found.violations, policy)
        if reference is None:
            continue  # validation already refused it; only a changed policy gets here
        try:
            image = await _resolve(lookups, org, field_path, reference)
        except FailedPreconditionError as unready:
            found.unready = found.unready or unready
            continue
        if image is None:
            found.missing[field_path] = text
        elif isinstance(image, str):
            found.violations.add(field_path, image)
        else:
            found.resolved[field_path] = image
    return found


async def _resolve(
    lookups: Lookups, org: str, field: str, reference: Reference
) -> ResolvedImage | str | None:
    """The resolved image, a violation's description, or None when it names nothing."""
    match reference:
        case PredictionRef(prediction_id):
            output = await lookups.prediction_output(org, prediction_id)
            if output is None:
                return None
            if output.status is not PredictionStatus.COMPLETED or output.artifact is None:
                raise FailedPreconditionError(
                    f"prediction {prediction_id} has not completed (it is "
                    f"{output.status.value}); only a completed prediction's output is an input",
                    field=field,
                )
            return _artifact(output.artifact)
        case ArtifactRef(sha256):
            artifact = await lookups.artifact(org, sha256)
            return None if artifact is None else _artifact(artifact)
        case FileRef(path):
            if not await asyncio.to_thread(path.is_file):
                return "no such file under the server's input roots"
            return ResolvedImage(format_reference(reference))
        case UrlRef():
            return ResolvedImage(format_reference(reference))
    raise AssertionError(f"unknown reference {reference!r}")  # pragma: no cover


async def resolve_base(
    lookups: Lookups, org: str, policy: ReferencePolicy, params: dict[str, Any]
) -> ResolvedImage:
    """The resolved ``base_image_url`` of a single-input strategy (see ``resolve_images``)."""
    field = "params.base_image_url"
    return (await resolve_images(lookups, org, policy, {field: params["base_image_url"]}))[field]


async def one_task_on_base(
    lookups: Lookups,
    org: str,
    policy: ReferencePolicy,
    params: dict[str, Any],
    task_type: TaskType,
    **task_params: Any,
) -> Plan:
    """The plan of a single-input strategy: one prediction, one task on the base image.

    The task's parameters are the resolved ``base_image``, ``task_params`` and the seed.
    """
    base = await resolve_base(lookups, org, policy, params)
    seed = choose_seed(params)
    task = PlannedTask(task_type, {"base_image": base.reference, **task_params, "seed": seed})
    return Plan((PlannedPrediction(seed, (task,)),))


def _artifact(artifact: Artifact) -> ResolvedImage:
    return ResolvedImage(f"artifact:{artifact.sha256}", artifact)


def choose_seed(params: dict[str, Any]) -> int:
    """The request's seed, or a random one recorded in ``params`` (it is echoed)."""
    if params.get("seed") is None:
        params["seed"] = secrets.randbelow(MAX_SEED + 1)
    return int(params["seed"])
