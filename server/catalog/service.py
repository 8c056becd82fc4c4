"""Create, read, list and delete catalog entities, independent of gRPC."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from server.config import MediaSettings
from server.domain import model
from server.domain.enums import CatalogKind
from server.domain.errors import (
    ArtifactStorageUnavailableError,
    NotFoundError,
    StartupError,
    Violations,
)
from server.domain.paging import Cursor, PageTokens, paginate, query_key
from server.domain.recorder import utcnow
from server.media.images import InvalidImageError, probe_image
from server.media.storage import ArtifactStorage, StorageUnavailableError
from server.media.uris import UriError, is_under, normalize
from server.store import mapping, repository, rows
from server.store.sessions import Store
from server.store.writer import Writer

MAX_REFERENCE_IMAGES = 8
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
_ARTIFACT_URI = re.compile(r"artifact:([0-9a-f]{64})")


@dataclass(frozen=True, slots=True)
class ImageInput:
    """A reference image given inline (``data``) or as ``artifact:<sha256>`` (``artifact``)."""

    data: bytes | None = None
    artifact: str = ""


@dataclass(frozen=True, slots=True)
class LoraInput:
    """A LoRA as asked for on create."""

    uri: str = ""
    default_weight: float | None = None


@dataclass(frozen=True, slots=True)
class EntityInput:
    """A catalog entity as asked for on create."""

    name: str = ""
    description: str = ""
    reference_images: list[ImageInput] = field(default_factory=list)
    lora: LoraInput | None = None


@dataclass(frozen=True, slots=True)
class _Image:
    sha256: str
    data: bytes | None
    mime_type: str
    width: int
    height: int
    uri: str


class CatalogService:
    """Every catalog use case, scoped to the caller's organization."""

    def __init__(
        self,
        store: Store,
        writer: Writer,
        artifacts: ArtifactStorage,
        *,
        media: MediaSettings,
        tokens: PageTokens,
    ) -> None:
        self._store = store
        self._writer = writer
        self._artifacts = artifacts
        self._media = media
        self._tokens = tokens
        self._cache = _EntityCache()
        self._lora_prefixes = lora_prefixes(media.lora_prefixes)

    async def create(self, org: str, kind: CatalogKind, entity: EntityInput) -> model.CatalogEntity:
        """Validate and store a new entity with its reference images.

        Raises:
            InvalidArgumentError: every offending field at once.
            NotFoundError: ``artifact:`` references to nothing stored, every one named.
        """
        v = Violations()
        missing: dict[str, str] = {}  # unknown artifacts by field path, reported together
        name = entity.name.strip()
        if not name:
            v.add("name", "is required")
        elif len(name) > 200:
            v.add("name", "must be at most 200 characters")
        if len(entity.description) > 2000:
            v.add("description", "must be at most 2000 characters")
        if entity.lora is not None:
            # The normalised URI is what is checked, so it is what is stored.
            lora = replace(entity.lora, uri=_check_lora(entity.lora, v, self._lora_prefixes))
            entity = replace(entity, lora=lora)
        if len(entity.reference_images) > MAX_REFERENCE_IMAGES:
            v.add("reference_images", f"must have at most {MAX_REFERENCE_IMAGES} images")
            images: list[_Image] = []
        else:
            images = await self._check_images(org, entity.reference_images, v, missing)
        v.raise_if_any()
        if entity.lora is not None and (match := _ARTIFACT_URI.fullmatch(entity.lora.uri)):
            async with self._store.read() as session:
                owned = await repository.get_owned_artifact(session, org, match.group(1))
            if owned is None:
                missing["lora.uri"] = entity.lora.uri
        if missing:
            raise NotFoundError.of("artifact", missing)
        return await self._insert(org, kind, name, entity, images)

    async def _check_images(
        self, org: str, inputs: Sequence[ImageInput], v: Violations, missing: dict[str, str]
    ) -> list[_Image]:
        """The usable images; faults go to ``v``, unknown artifacts to ``missing``."""
        images: list[_Image] = []
        for index, image in enumerate(inputs):
            path = f"reference_images[{index}]"
            if image.data is not None:
                try:
                    info = await asyncio.to_thread(
                        probe_image,
                        image.data,
                        max_bytes=self._media.max_input_bytes,
                        max_pixels=self._media.max_input_pixels,
                    )
                except InvalidImageError as exc:
                    v.add(f"{path}.data", str(exc))
                    continue
                sha = await asyncio.to_thread(_sha256, image.data)
                uri = model.artifact_name(sha)
                images.append(_Image(sha, image.data, info.mime_type, info.width, info.height, uri))
                continue
            match = _ARTIFACT_URI.fullmatch(_normalized(image.artifact))
            if match is None:
                v.add(f"{path}.artifact", "must be artifact:<sha256 hex>, or give inline data")
                continue
            async with self._store.read() as session:
                owned = await repository.get_owned_artifact(session, org, match.group(1))
            if owned is None:
                missing[f"{path}.artifact"] = image.artifact
                continue
            artifact = owned[0]
            if not artifact.mime_type.startswith("image/"):
                v.add(f"{path}.artifact", f"must be an image, not {artifact.mime_type}")
                continue
            images.append(
                _Image(
                    artifact.sha256,
                    None,
                    artifact.mime_type,
                    artifact.width,
                    artifact.height,
                    model.artifact_name(artifact.sha256),
                )
            )
        return images

    async def _insert(
        self, org: str, kind: CatalogKind, name: str, entity: EntityInput, images: list[_Image]
    ) -> model.CatalogEntity:
        stored: dict[str, model.Artifact] = {}
        now = utcnow()
        for image in images:
            if image.data is not None and image.sha256 not in stored:
                try:
                    blob = await self._artifacts.put(image.data, image.mime_type)
                except StorageUnavailableError:
                    raise ArtifactStorageUnavailableError() from None
                stored[image.sha256] = model.Artifact(
                    sha256=blob.sha256,
                    mime_type=image.mime_type,
                    size_bytes=blob.size_bytes,
                    width=image.width,
                    height=image.height,
                    uri=blob.uri,
                    created_at=now,
                )
        created = model.CatalogEntity(
            id=str(uuid.uuid4()),
            organization=org,
            kind=kind.value,
            name=name,
            description=entity.description,
            created_at=now,
            reference_images=[
                model.ReferenceImage(
                    image.sha256, image.mime_type, image.width, image.height, image.uri
                )
                for image in images
            ],
            lora_uri=entity.lora.uri if entity.lora else "",
            lora_default_weight=entity.lora.default_weight if entity.lora else None,
        )
        await self._writer.write(rows.catalog_ops(created, list(stored.values())))
        self._cache.put(created)
        return created

    async def entity(
        self, org: str, kind: CatalogKind, entity_id: str
    ) -> model.CatalogEntity | None:
        """The entity, or None; served from a cache a delete here invalidates."""
        cached = self._cache.get(org, kind, entity_id)
        if cached is not None:
            return cached
        async with self._store.read() as session:
            row = await repository.get_entity(session, org, kind, entity_id)
            found = None if row is None else mapping.catalog_entity(row)
        if found is not None:
            self._cache.put(found)
        return found

    async def get(self, org: str, kind: CatalogKind, entity_id: str) -> model.CatalogEntity:
        """One entity.

        Raises:
            NotFoundError: unknown id, or another organization's.
        """
        found = await self.entity(org, kind, entity_id)
        if found is None:
            raise _not_found(kind, entity_id)
        return found

    async def list(
        self, org: str, kind: CatalogKind, page_size: int, page_token: str
    ) -> tuple[Sequence[model.CatalogEntity], str]:
        """One page of entities, newest first, and the next page's token."""

        async def fetch(cursor: Cursor | None, limit: int) -> Sequence[model.CatalogEntity]:
            async with self._store.read() as session:
                rows = await repository.list_entities(session, org, kind, cursor, limit)
                return [mapping.catalog_entity(row) for row in rows]

        return await paginate(
            fetch,
            page_size=page_size,
            page_token=page_token,
            key=query_key("catalog", kind.value),
            tokens=self._tokens,
            default_size=DEFAULT_PAGE_SIZE,
            max_size=MAX_PAGE_SIZE,
        )

    async def delete(self, org: str, kind: CatalogKind, entity_id: str) -> None:
        """Remove an entity; generations created from it keep what they copied.

        Raises:
            NotFoundError: unknown id, or another organization's.
        """
        if await self.entity(org, kind, entity_id) is None:
            raise _not_found(kind, entity_id)
        self._cache.forget(entity_id)
        await self._writer.write([rows.delete_entity_op(entity_id)])


class _EntityCache:
    """Recently used entities by id; a delete here forgets one at once, the rest expire.

    Expiry bounds how long another process's delete can go unseen.
    """

    def __init__(self, *, size: int = 10_000, ttl: float = 30.0) -> None:
        self._items: OrderedDict[str, tuple[float, model.CatalogEntity]] = OrderedDict()
        self._size = size
        self._ttl = ttl

    def get(self, org: str, kind: CatalogKind, entity_id: str) -> model.CatalogEntity | None:
        item = self._items.get(entity_id)
        if item is None:
            return None
        loaded, entity = item
        if time.monotonic() - loaded > self._ttl:
            del self._items[entity_id]
            return None
        if entity.organization != org or entity.kind != kind.value:
            return None
        self._items.move_to_end(entity_id)
        return entity

    def put(self, entity: model.CatalogEntity) -> None:
        self._items[entity.id] = (time.monotonic(), entity)
        self._items.move_to_end(entity.id)
        while len(self._items) > self._size:
            self._items.popitem(last=False)

    def forget(self, entity_id: str) -> None:
        self._items.pop(entity_id, None)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _not_found(kind: CatalogKind, entity_id: str) -> NotFoundError:
    name = kind.value.lower()
    return NotFoundError.of(name, {f"{name}_id": entity_id})


def _normalized(text: str) -> str:
    """``text`` normalised (``ARTIFACT:`` is ``artifact:``), or as given when it cannot be."""
    try:
        return str(normalize(text))
    except UriError:
        return text


def lora_prefixes(configured: Sequence[str]) -> tuple[str, ...]:
    """The configured LoRA prefixes, normalised as the URIs they are compared with.

    Raises:
        StartupError: a prefix is not an absolute URI, or cannot be normalised.
    """
    prefixes = []
    for prefix in configured:
        try:
            uri = normalize(prefix)
        except UriError as exc:
            raise StartupError(f"LoRA prefix {prefix!r} {exc}") from None
        if not uri.scheme or uri.authority is None:
            raise StartupError(f"LoRA prefix {prefix!r} must be an absolute URI: scheme://...")
        prefixes.append(str(uri))
    return tuple(prefixes)


def _check_lora(lora: LoraInput, v: Violations, prefixes: tuple[str, ...]) -> str:
    """The normalised LoRA URI; a violation unless it is an upload or under a prefix.

    An upload of the organization is ``artifact:<sha256>``; anything else must lie under
    one of ``prefixes`` (normalised), on a segment boundary, once normalised itself.
    """
    uri = lora.uri
    if not uri:
        v.add("lora.uri", "is required when lora is set")
    elif len(uri) > 2048:
        v.add("lora.uri", "must be at most 2048 characters")
    else:
        problem, uri = _lora_uri(uri, prefixes)
        if problem is not None:
            v.add("lora.uri", problem)
    weight = lora.default_weight
    if weight is not None and not 0 <= weight <= 2:
        v.add("lora.default_weight", f"must be between 0 and 2, got {weight:g}")
    return uri


def _lora_uri(text: str, prefixes: tuple[str, ...]) -> tuple[str | None, str]:
    """What is wrong with a LoRA URI (or None), and its normalised form."""
    try:
        uri = normalize(text)
    except UriError as exc:
        return str(exc), text
    normal = str(uri)
    if uri.scheme == "artifact":
        if not _ARTIFACT_URI.fullmatch(normal):
            return "must be artifact:<sha256 hex> for an upload", normal
        return None, normal
    if uri.authority is not None and "@" in uri.authority:
        return "must not contain credentials (user:password@)", normal
    if not any(is_under(normal, prefix) for prefix in prefixes):
        allowed = ", ".join(prefixes) or "none configured"
        return (
            f"must be an upload (artifact:<sha256>) or lie under an allowed prefix ({allowed})",
            normal,
        )
    return None, normal
