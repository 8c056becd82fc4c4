"""Artifact storage in S3-compatible object storage (S3, R2, GCS, MinIO), for several replicas.

Each blob is the object ``<prefix>/<ab>/<sha256>`` (its content type set), written once.
Nothing partial is ever visible: a blob up to ``part_bytes`` goes in one PutObject (atomic
in S3), a larger one as a multipart upload that is completed only once every part is in
and aborted on every failure path, a cancellation included (the abort runs to its end
even then). An upload is received into a local spool file first, where it is hashed and
probed; only an upload that passed goes to the bucket, under its digest. Downloads are
ranged GETs read in bounded chunks.

The client is aiobotocore (botocore on aiohttp): every call is explicit, so the multipart
life cycle is ours to test, and credentials come the standard AWS way (environment,
shared config and profiles, container and instance roles, SSO, web identity).
Checksums are sent and validated only where an operation requires them, as several
S3-compatible services refuse botocore's newer default headers; whole reads are checked
against the digest instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from server.domain.errors import StartupError
from server.media.spool import TEMP, SpooledUpload, SpoolFile, sweep_temp_files
from server.media.storage import (
    ArtifactCorruptError,
    ArtifactNotFoundError,
    StorageError,
    StorageUnavailableError,
    StoredBlob,
    check_digest,
)

if TYPE_CHECKING:
    from aiobotocore.response import StreamingBody
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import GetObjectOutputTypeDef

log = logging.getLogger(__name__)
T = TypeVar("T")
MIN_PART_BYTES = 5 * 1024 * 1024  # S3's smallest part but the last
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
# Codes that say "not now" rather than "never" (besides every 5xx status).
_BUSY = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"})
P = ParamSpec("P")


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """S3 and transport errors as ``StorageError``s; "no such key" is the caller's to read."""
    try:
        yield
    except ClientError as exc:
        code = _code(exc)
        if code in _MISSING or code == "InvalidRange":
            raise
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        kind = StorageUnavailableError if status >= 500 or code in _BUSY else StorageError
        raise kind(f"S3 refused the call: {code}") from exc
    except (BotoCoreError, aiohttp.ClientError) as exc:
        raise StorageUnavailableError(f"S3 cannot be reached: {type(exc).__name__}") from exc


def _translating(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """``method`` with its S3 errors ``_translated``."""

    @functools.wraps(method)
    async def translated(*args: P.args, **kwargs: P.kwargs) -> T:
        with _translated():
            return await method(*args, **kwargs)

    return translated


class S3ArtifactStorage:
    """Blobs as objects under ``s3://bucket/prefix``.

    Args:
        bucket: the bucket, which must exist.
        prefix: the key prefix of every blob ("" for the bucket's root).
        endpoint_url: another S3-compatible service than AWS ("" for AWS).
        addressing_style: "path" for services without virtual-host buckets (MinIO).
        part_bytes: the size of a multipart upload's parts, and the largest single PUT.
        spool_dir: where uploads are received before they are sent on.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str = "",
        addressing_style: Literal["auto", "virtual", "path"] = "auto",
        part_bytes: int = 8 * 1024 * 1024,
        spool_dir: Path,
    ) -> None:
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part_bytes must be at least {MIN_PART_BYTES}")
        self._bucket = bucket
        self._prefix = prefix.strip("/")
        self._endpoint_url = endpoint_url or None
        self._config = AioConfig(
            s3={"addressing_style": addressing_style},
            retries={"mode": "standard", "total_max_attempts": 3},  # the first one included
            connect_timeout=10,
            read_timeout=60,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._part_bytes = part_bytes
        self._spool_dir = spool_dir
        self._stack = contextlib.AsyncExitStack()
        self._client: S3Client | None = None

    @property
    def location(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self._bucket}/{self._prefix}"

    @property
    def client(self) -> S3Client:
        """The S3 client (after ``start``)."""
        if self._client is None:
            raise RuntimeError("the storage is not started")
        return self._client

    def key(self, sha256: str) -> str:
        """The object key of the blob ``sha256``."""
        check_digest(sha256)
        name = f"{sha256[:2]}/{sha256}"
        return f"{self._prefix}/{name}" if self._prefix else name

    async def start(self) -> None:
        """Connect and check that the bucket can be reached with these credentials.

        Raises:
            StartupError: it cannot; the message names the bucket and the S3 error code.
        """
        if self._client is None:
            context = get_session().create_client(
                "s3", endpoint_url=self._endpoint_url, config=self._config
            )
            self._client = await self._stack.enter_async_context(context)
        try:
            await self.client.head_bucket(Bucket=self._bucket)
        except ClientError as exc:
            raise StartupError(
                f"artifact storage {self.location} cannot be used: {_code(exc)}"
            ) from None
        except BotoCoreError as exc:
            raise StartupError(
                f"artifact storage {self.location} cannot be reached: {exc}"
            ) from None

    async def aclose(self) -> None:
        """Close the client's connections; idempotent."""
        self._client = None
        await self._stack.aclose()

    @_translating
    async def put(self, data: bytes, mime_type: str) -> StoredBlob:
        """Store ``data`` as one PUT, or in parts when larger than a part."""
        sha256 = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        if await self.size(sha256) is not None:
            return StoredBlob(sha256, len(data), existed=True)
        view = memoryview(data)
        count = max(1, -(-len(data) // self._part_bytes))

        async def part(number: int) -> bytes:
            start = (number - 1) * self._part_bytes
            return bytes(view[start : start + self._part_bytes])

        await self._send(self.key(sha256), mime_type, len(data), count, part)
        return StoredBlob(sha256, len(data))

    def begin_upload(self) -> S3Upload:
        """An upload received into a spool file, sent to the bucket on commit."""
        return S3Upload(self, SpoolFile(self._spool_dir))

    @_translating
    async def send_file(self, path: Path, sha256: str, size: int, mime_type: str) -> StoredBlob:
        """Store the file ``path`` holding ``size`` bytes that hash to ``sha256``."""
        if await self.size(sha256) is not None:
            return StoredBlob(sha256, size, existed=True)
        count = max(1, -(-size // self._part_bytes))

        async def part(number: int) -> bytes:
            start = (number - 1) * self._part_bytes
            return await asyncio.to_thread(_read_at, path, start, self._part_bytes)

        await self._send(self.key(sha256), mime_type, size, count, part)
        return StoredBlob(sha256, size)

    async def _send(
        self,
        key: str,
        mime_type: str,
        size: int,
        count: int,
        part: Callable[[int], Awaitable[bytes]],
    ) -> None:
        """Write ``count`` parts as one object: visible whole, or not at all."""
        if count == 1:
            body = await part(1)
            await self.client.put_object(
                Bucket=self._bucket, Key=key, Body=body, ContentType=mime_type
            )
            return
        created, cancelled = await _to_the_end(
            self.client.create_multipart_upload(Bucket=self._bucket, Key=key, ContentType=mime_type)
        )
        if created.exception() is not None and cancelled:
            raise asyncio.CancelledError
        upload_id = created.result()["UploadId"]
        try:
            if cancelled:
                raise asyncio.CancelledError
            parts: list[Any] = []
            for number in range(1, count + 1):
                answer = await self.client.upload_part(
                    Bucket=self._bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=await part(number),
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
            await self.client.complete_multipart_upload(
                Bucket=self._bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            _, again = await _to_the_end(self._abort(key, upload_id))
            if again:
                raise asyncio.CancelledError from None
            raise

    async def _abort(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload; never raises (a failure is logged, a sweep ends it)."""
        try:
            await self.client.abort_multipart_upload(
                Bucket=self._bucket, Key=key, UploadId=upload_id
            )
        except Exception as exc:  # a cleanup path: whatever the client raises
            code = _code(exc) if isinstance(exc, ClientError) else type(exc).__name__
            if code != "NoSuchUpload":  # completed after all, or aborted already
                log.warning("could not abort the multipart upload of %s: %s", key, code)

    @_translating
    async def read(self, sha256: str) -> bytes:
        """The whole object, checked against its digest."""
        answer = await self._get(sha256)
        async with answer["Body"] as body:
            data = await body.read()
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
        if digest != sha256:
            raise ArtifactCorruptError(sha256)
        return data

    async def stream(
        self, sha256: str, offset: int, chunk_bytes: int
    ) -> AsyncGenerator[bytes, None]:
        """One ranged GET from ``offset``, read ``chunk_bytes`` at a time."""
        with _translated():
            try:
                answer = await self._get(sha256, f"bytes={offset}-" if offset else None)
            except ClientError as exc:
                if _code(exc) == "InvalidRange":
                    return  # at (or past) the end: nothing left to send
                raise
            async with answer["Body"] as body:
                while True:
                    chunk = await _read_full(body, chunk_bytes)
                    if not chunk:
                        return
                    yield chunk

    async def _get(self, sha256: str, byte_range: str | None = None) -> GetObjectOutputTypeDef:
        key = self.key(sha256)
        try:
            if byte_range is None:
                return await self.client.get_object(Bucket=self._bucket, Key=key)
            return await self.client.get_object(Bucket=self._bucket, Key=key, Range=byte_range)
        except ClientError as exc:
            if _code(exc) in _MISSING:
                raise ArtifactNotFoundError(sha256) from None
            raise

    @_translating
    async def size(self, sha256: str) -> int | None:
        """The object's size (HEAD), None when there is none."""
        try:
            answer = await self.client.head_object(Bucket=self._bucket, Key=self.key(sha256))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        return answer["ContentLength"]

    @_translating
    async def sweep(self, *, max_age: float) -> int:
        """Abort multipart uploads under the prefix older than ``max_age``; remove dead spools.

        A multipart upload is left open only by a process killed while sending it.
        """
        removed = await asyncio.to_thread(
            sweep_temp_files, self._spool_dir, f"{TEMP}*", max_age=max_age
        )
        before = datetime.now(UTC) - timedelta(seconds=max_age)
        prefix = f"{self._prefix}/" if self._prefix else ""
        paginator = self.client.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if upload["Initiated"] < before:
                    await self._abort(upload["Key"], upload["UploadId"])
                    removed += 1
        return removed


class S3Upload(SpooledUpload):
    """An upload received into a spool file, then sent to the bucket under its digest."""

    def __init__(self, storage: S3ArtifactStorage, spool: SpoolFile) -> None:
        super().__init__(spool)
        self._storage = storage

    async def commit(self, mime_type: str) -> StoredBlob:
        """Send the received file; the spool file is removed either way (by ``discard``).

        Raises:
            ValueError: the upload was not finished, or was discarded.
        """
        if not self._digest:
            raise ValueError("the upload was discarded or not finished")
        path = self._spool.path
        blob = await self._storage.send_file(path, self._digest, self.size_bytes, mime_type)
        await self.discard()
        return blob


async def _to_the_end(work: Awaitable[T]) -> tuple[asyncio.Future[T], bool]:
    """Wait for ``work`` to end even when cancelled meanwhile: (its future, whether cancelled).

    Cleanup and the creation of a multipart upload must not be cut half-way: an upload
    created on the server whose id was lost would stay open, never visible, until a sweep.
    """
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    return task, cancelled


async def _read_full(body: StreamingBody, size: int) -> bytes:
    """Up to ``size`` bytes from a streaming body; fewer only at its end."""
    pieces: list[bytes] = []
    wanted = size
    while wanted:
        piece = await body.read(wanted)
        if not piece:
            break
        pieces.append(piece)
        wanted -= len(piece)
    return b"".join(pieces)


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def _code(exc: ClientError) -> str:
    """The S3 error code of a failed call (never anything that could hold a credential)."""
    return str(exc.response.get("Error", {}).get("Code", "unknown"))
