"""The fleet's board: a stateless API server over the shared task records.

Any API server answers for any task: the record (``records``) is in Redis, the outputs in
object storage, and the work goes to the Celery workers (``worker``) through the broker,
one queue per task type. A submit stores the task's ``data:`` inputs in the storage (the
record names them ``artifact:<sha256>``), creates the record atomically with its
idempotency key, and queues a delivery; a submit of a key whose record exists answers it,
queueing it again if its first delivery was never confirmed queued (the API server that
created it died in between). Following a task subscribes to its events channel and reads
the record at each change (and every few seconds, in case an event was missed).

Redis or storage failures are TRANSIENT ``ComputeError``s: the adapter retries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from server.compute.base import ComputeError, TaskRequest, UnknownComputeTaskError
from server.compute.diffusion import providers
from server.compute.fleet.records import CANCEL, CREATE, LIVE_WORKERS, Keys, TaskRecord
from server.compute.fleet.worker import RUN_TASK, make_celery, queue_name
from server.compute.server.board import OutputBytes
from server.compute.server.settings import ComputeServerSettings
from server.compute.wire import Capacity, TaskAnswer, decode_data_uri, is_data_uri, map_strings
from server.config import MediaSettings
from server.domain.enums import ComputeErrorCategory, TaskType
from server.media.backends import open_storage
from server.media.storage import ArtifactStorage, StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
# A record is re-read this often while followed, whatever the events say.
_REREAD_S = 2.0
# A pending record never confirmed queued is queued again once it is this old.
_REQUEUE_AFTER_S = 5.0


class FleetBoard:
    """A ``TaskBoard`` over Redis records, a Celery broker and object storage."""

    def __init__(self, settings: ComputeServerSettings) -> None:
        self._settings = settings
        self._keys = Keys(settings.namespace)
        self._redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=10)
        self._create = self._redis.register_script(CREATE)
        self._cancel = self._redis.register_script(CANCEL)
        self._live_workers = self._redis.register_script(LIVE_WORKERS)
        self._celery = make_celery(settings)
        self._storage: ArtifactStorage = open_storage(settings.storage, MediaSettings())
        self._ttl_ms = int(settings.retain_finished_s * 1000)
        # What the workers run: they read the same settings (weights on their machines).
        self.serving = providers(settings.models, runs_here=False).serving

    async def start(self) -> None:
        """Open the storage and check Redis answers."""
        await self._storage.start()
        await self._redis.ping()

    # -- the board -------------------------------------------------------------------------

    async def submit(self, request: TaskRequest) -> TaskAnswer:
        """Create the record (or find the key's) and queue a delivery."""
        known = await self._by_key(request.idempotency_key)
        if known is not None:
            await self._requeue_if_lost(known)
            return known.answer()
        waiting = await self._shared(self._redis.scard(self._keys.pending))
        if waiting >= self._settings.max_waiting:
            raise ComputeError(ComputeErrorCategory.CAPACITY, f"{waiting} tasks are waiting")
        params, inputs = await self._stored_inputs(request.params)
        task_id = f"task-{uuid.uuid4()}"
        named = await self._shared(
            self._create(
                keys=[
                    self._keys.key(request.idempotency_key),
                    self._keys.task(task_id),
                    self._keys.pending,
                    self._keys.created,
                ],
                args=[
                    task_id,
                    request.idempotency_key,
                    request.task_type.value,
                    request.organization,
                    json.dumps(params),
                    json.dumps(inputs),
                ],
            )
        )
        record = await self._record(named.decode())
        if record.id == task_id:
            await self._queue(record)
        else:
            await self._requeue_if_lost(record)
        return record.answer()

    async def find(self, idempotency_key: str) -> TaskAnswer | None:
        """The record the key names, if it is still kept."""
        record = await self._by_key(idempotency_key)
        return None if record is None else record.answer()

    async def get(self, task_id: str) -> TaskAnswer:
        """The record now (queued again if its delivery was lost before it was queued)."""
        record = await self._record(task_id)
        await self._requeue_if_lost(record)
        return record.answer()

    async def follow(self, task_id: str) -> AsyncIterator[TaskAnswer]:
        """The record now and at each version published, until it is terminal."""
        channel = self._keys.events(task_id)
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._shared(pubsub.subscribe(channel))
            record = await self._record(task_id)
            version = record.version
            yield record.answer()
            while not record.terminal:
                try:
                    await self._shared(pubsub.get_message(timeout=_REREAD_S))
                except ComputeError:
                    await asyncio.sleep(_REREAD_S)  # a broken subscription: read on a timer
                record = await self._record(task_id)
                if record.version != version:
                    version = record.version
                    yield record.answer()
        finally:
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            except (RedisError, OSError) as exc:
                log.debug("closing a task subscription: %s", exc)

    async def output(self, task_id: str, index: int) -> OutputBytes | None:
        """An output's bytes, read from the storage by their SHA-256."""
        record = await self._record(task_id)
        if record.status != "completed" or not 0 <= index < len(record.outputs):
            return None
        output = record.outputs[index]
        try:
            data = await self._storage.read(output.sha256)
        except FileNotFoundError:
            return None
        except (StorageError, OSError) as exc:
            raise ComputeError(ComputeErrorCategory.TRANSIENT, f"storage: {exc}") from None
        return OutputBytes(data, output.mime_type)

    async def cancel(self, task_id: str) -> TaskAnswer:
        """Cancel it; a running task is waited for up to ``cancel_wait_s``."""
        keys = self._keys
        outcome = await self._shared(
            self._cancel(
                keys=[
                    keys.task(task_id),
                    keys.pending,
                    keys.ended,
                    keys.key(""),
                    keys.events(task_id),
                ],
                args=[self._ttl_ms],
            )
        )
        if outcome.decode() == "gone":
            raise UnknownComputeTaskError(task_id)
        if outcome.decode() == "requested":
            answer: TaskAnswer | None = None
            try:
                async with asyncio.timeout(self._settings.cancel_wait_s):
                    async for answer in self.follow(task_id):  # noqa: B007  # the last one
                        pass
            except TimeoutError:
                pass
            if answer is not None:
                return answer
        return (await self._record(task_id)).answer()

    async def capacity(self) -> tuple[Capacity, int, int]:
        """Live workers, running and pending tasks, and the counters."""
        keys = self._keys
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.scard(keys.running)
            pipe.scard(keys.pending)
            pipe.get(keys.created)
            pipe.get(keys.ended)
            running, waiting, created, ended = await self._shared(pipe.execute())
        workers = await self._shared(self._live_workers(keys=[keys.workers]))
        return (
            Capacity(workers=int(workers), running=running, waiting=waiting),
            int(created or 0),
            int(ended or 0),
        )

    async def aclose(self) -> None:
        """Close Redis, the broker's connections and the storage; never raises."""
        for close in (self._redis.aclose, self._storage.aclose):
            try:
                await close()
            except Exception as exc:  # closing must not raise
                log.warning("fleet board close: %s", exc)
        try:
            await asyncio.to_thread(self._celery.close)
        except Exception as exc:  # closing must not raise
            log.warning("fleet board close: %s", exc)

    # -- internals -------------------------------------------------------------------------

    async def _record(self, task_id: str) -> TaskRecord:
        fields = await self._shared(self._redis.hgetall(self._keys.task(task_id)))
        if not fields:
            raise UnknownComputeTaskError(task_id)
        try:
            return TaskRecord.from_hash(fields)
        except ValueError as exc:
            raise ComputeError(ComputeErrorCategory.INTERNAL, f"task {task_id}: {exc}") from None

    async def _by_key(self, idempotency_key: str) -> TaskRecord | None:
        task_id = await self._shared(self._redis.get(self._keys.key(idempotency_key)))
        if task_id is None:
            return None
        try:
            return await self._record(task_id.decode() if isinstance(task_id, bytes) else task_id)
        except UnknownComputeTaskError:
            return None  # retired between the two reads

    async def _queue(self, record: TaskRecord) -> None:
        """Send a delivery of the task to its type's queue, then mark it queued."""
        queue = queue_name(self._settings, TaskType(record.task_type))
        try:
            await asyncio.to_thread(self._celery.send_task, RUN_TASK, args=[record.id], queue=queue)
        except Exception as exc:  # the broker's client raises many kinds
            raise ComputeError(
                ComputeErrorCategory.TRANSIENT, f"the task could not be queued: {exc}"
            ) from None
        await self._shared(self._redis.hset(self._keys.task(record.id), "queued", "1"))

    async def _requeue_if_lost(self, record: TaskRecord) -> None:
        """Queue a pending task again when no delivery was confirmed for it."""
        if record.status != "pending" or record.queued:
            return
        if time.time() - record.created_at.timestamp() < _REQUEUE_AFTER_S:
            return
        log.warning("task %s was never queued; queueing it now", record.id)
        await self._queue(record)

    async def _stored_inputs(self, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """``params`` with each ``data:`` input stored and named ``artifact:<sha256>``."""
        found: list[str] = []

        def collect(value: str) -> str:
            if is_data_uri(value):
                found.append(value)
            return value

        map_strings(params, collect)
        named: dict[str, str] = {}
        for uri in dict.fromkeys(found):
            try:
                data = decode_data_uri(uri, self._settings.max_input_bytes)
            except ValueError as exc:
                raise ComputeError(ComputeErrorCategory.VALIDATION, f"an input: {exc}") from None
            try:
                blob = await self._storage.put(data, uri[5 : uri.index(";")])
            except (StorageError, OSError) as exc:
                raise ComputeError(ComputeErrorCategory.TRANSIENT, f"storage: {exc}") from None
            named[uri] = f"artifact:{blob.sha256}"
        replaced: dict[str, Any] = map_strings(params, lambda v: named.get(v, v))
        return replaced, sorted({ref.removeprefix("artifact:") for ref in named.values()})

    @staticmethod
    async def _shared(call: Awaitable[T]) -> T:
        """Await a Redis call; its failure is TRANSIENT."""
        try:
            return await call
        except (RedisError, OSError) as exc:
            raise ComputeError(
                ComputeErrorCategory.TRANSIENT, f"task records unavailable: {exc}"
            ) from None
