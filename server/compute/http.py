"""The HTTP compute backend: the engine's adapter to a remote compute server (see ``wire``).

A pooled ``httpx.AsyncClient`` with per-call timeouts and a bearer token, and a second
one for the events streams (a stream holds its connection while its task runs, and must
never leave the other calls waiting for one). Every call goes through its operation's
circuit breaker (submit, lookup, status, events, download, cancel, health) and every
answer through the wire schema; errors map onto ``ComputeError`` categories in
``transport``. Retrying is the engine's business (``retry.RetryPolicy``), so one policy
covers every call of every backend.

A submit carries the task's idempotency key (body and ``Idempotency-Key`` header): a
retried submit whose first answer was lost finds the same remote task, and ``find`` looks
the task up by that key when the engine must release a task whose submit it gave up on.

A task is followed on its events stream (``GET /api/v1/tasks/{id}/events``, server-sent
events read with httpx-sse): every event's data is parsed through the wire schema, and
the task's state is yielded at each change. Polling the task is the fallback, for the
rest of that watch, when the stream cannot be opened (refused, 5xx, the events breaker
open), the server has no such route (404, 405, 501: an older server), an event does not
parse (or names another task, or its number does not count up), the stream is cut or
ends before the terminal state, or nothing, not even a keep-alive, arrives within the
read timeout. None of these is an error of the watch: the poll decides (a task the server
really forgot is a 404 there too). The watch goes on from the state it yielded last,
never yielding the same (status, progress) twice in a row nor a state behind it. A
stream is one "events" call for its breaker, counted when it ends. ``push=False``
(``SARTIQ_COMPUTE__PUSH``) polls only. Status is polled with backoff between
``poll_min_s`` and ``poll_max_s``.

Each output of a completed task (pushed or polled) is downloaded from its task's own
output path only, its size and SHA-256 checked against the answer that named it while
the bytes arrive, then decoded (``outputs.probed``): the mime type and media facts are
the bytes', never the JSON's. A mismatch or an undecodable output is TRANSIENT: the
engine follows the task and downloads again within its retry budget, then fails the task
with the reason. ``artifact:`` inputs go inline as ``data:`` URIs, up to
``inline_limit`` bytes per task (signed download links are not built).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx
from httpx_sse import EventSource, SSEError
from pydantic import BaseModel

from server.compute import transport
from server.compute.base import (
    ComputeError,
    OutputFile,
    TaskRequest,
    TaskSnapshot,
    UnknownComputeTaskError,
)
from server.compute.breaker import Breakers
from server.compute.outputs import MAX_OUTPUT_BYTES, probed
from server.compute.wire import (
    EVENTS_KEEPALIVE_S,
    EVENTS_TYPE,
    HEALTH_PATH,
    TASK_EVENT,
    TASKS_PATH,
    HealthAnswer,
    OutputItem,
    SubmitRequest,
    TaskAnswer,
    TaskList,
    WireFormatError,
    data_uri,
    events_path,
    map_strings,
    parse,
    task_path,
)
from server.domain.enums import ComputeErrorCategory, TaskStatus
from server.domain.states import TASK_TERMINAL
from server.media.probe import InvalidMediaError

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
_ARTIFACT_PREFIX = "artifact:"
# Answers to the events call that mean "no push here" (an older server), not a fault.
_NO_EVENTS_ROUTE = (404, 405, 501)
# Where a status stands: a state is never followed by one of a lower rank.
_RANK = {TaskStatus.PENDING: 0, TaskStatus.RUNNING: 1} | dict.fromkeys(TASK_TERMINAL, 2)


class _NoPushError(Exception):
    """The events stream cannot (or can no longer) serve this watch: poll instead."""


class _Seen:
    """The last state a watch yielded: what is news, and what would go backwards."""

    def __init__(self) -> None:
        self.last: tuple[TaskStatus, float] | None = None

    def news(self, answer: TaskAnswer) -> bool:
        """Whether ``answer`` is to be yielded (and it is now the last state)."""
        state = (answer.task_status, answer.progress)
        if self.last is not None:
            (status, progress), (last_status, last_progress) = state, self.last
            if _RANK[status] < _RANK[last_status] or state == self.last:
                return False
            if status is last_status and progress < last_progress:
                return False
        self.last = state
        return True


class HttpComputeBackend:
    """A ``ComputeBackend`` speaking the compute wire protocol over HTTP."""

    name = "http"

    def __init__(
        self,
        base_url: str,
        *,
        resolve: Callable[[str], bytes],
        token: str = "",
        timeout_s: float = 10.0,
        poll_min_s: float = 0.05,
        poll_max_s: float = 1.0,
        inline_limit: int = 32 * 1024 * 1024,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
        breakers: Breakers | None = None,
        push: bool = True,
    ) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )
        self._resolve = resolve
        # Inputs are read (``resolve``) on threads of their own: a resolver that waits for
        # the event loop, whose storage reads use the loop's default executor, would
        # deadlock once every default thread waited in it (concurrent submits).
        self._inliner = ThreadPoolExecutor(max_workers=4, thread_name_prefix="inline")
        self._push = push
        # Streams get their own pool: a connection per task followed, held while it runs,
        # must never leave the other calls waiting for one. A stream is silent at most
        # EVENTS_KEEPALIVE_S between keep-alives.
        self._events_client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, read=max(timeout_s, 3 * EVENTS_KEEPALIVE_S)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=16),
        )
        self._poll_min_s = poll_min_s
        self._poll_max_s = poll_max_s
        self._inline_limit = inline_limit
        self._max_output_bytes = max_output_bytes
        self.breakers = breakers or Breakers()

    async def submit(self, request: TaskRequest) -> str:
        """Create the remote task (or find the one this idempotency key created)."""
        loop = asyncio.get_running_loop()
        parameters = await loop.run_in_executor(self._inliner, self._inline, request.params)
        body = SubmitRequest(
            task_type=request.task_type.value,
            parameters=parameters,
            idempotency_key=request.idempotency_key,
            origin_organization=request.organization,
        )
        answer = await self._call(
            "submit",
            TaskAnswer,
            "POST",
            TASKS_PATH,
            json=body.model_dump(mode="json"),
            headers={"idempotency-key": request.idempotency_key},
        )
        if answer.idempotency_key != request.idempotency_key:
            raise _malformed("submit", "the answer names another idempotency key")
        return answer.id

    async def find(self, idempotency_key: str) -> str | None:
        """The remote task this idempotency key created, if the server has one."""
        answer = await self._call(
            "lookup", TaskList, "GET", TASKS_PATH, params={"idempotency_key": idempotency_key}
        )
        found = [task.id for task in answer.tasks if task.idempotency_key == idempotency_key]
        return found[0] if found else None

    async def watch(self, compute_id: str) -> AsyncIterator[TaskSnapshot]:
        """Follow the task, yielding a snapshot at each change, ending with the terminal one.

        Its events stream first (unless push is off), then polling if the stream fails.

        Raises:
            UnknownComputeTaskError: the server does not know the task (any more).
            ComputeError: a poll or a download failed (TRANSIENT when worth re-watching).
        """
        seen = _Seen()
        if self._push:
            try:
                async with contextlib.aclosing(self._pushed(compute_id)) as answers:
                    async for answer in answers:
                        if seen.news(answer):
                            yield await self._snapshot(compute_id, answer)
                        if answer.task_status in TASK_TERMINAL:
                            return
            except _NoPushError as exc:
                log.info("task %s: polling, not on its events stream: %s", compute_id, exc)
        delay = self._poll_min_s
        while True:
            answer = await self._task("status", "GET", task_path(compute_id), compute_id)
            if seen.news(answer):
                delay = self._poll_min_s
                yield await self._snapshot(compute_id, answer)
            if answer.task_status in TASK_TERMINAL:
                return
            await asyncio.sleep(delay)
            delay = min(self._poll_max_s, delay * 1.5)

    async def cancel(self, compute_id: str) -> bool:
        """Ask the server to stop the task; True once it reports it terminal (or unknown)."""
        try:
            answer = await self._task(
                "cancel", "POST", f"{task_path(compute_id)}/cancel", compute_id
            )
        except UnknownComputeTaskError:
            return True  # nothing there to release
        return answer.task_status in TASK_TERMINAL

    async def health(self) -> HealthAnswer:
        """The server's health answer (status, capacity, task counters)."""
        return await self._call("health", HealthAnswer, "GET", HEALTH_PATH)

    async def aclose(self) -> None:
        """Close the connection pools and the input threads."""
        await self._client.aclose()
        await self._events_client.aclose()
        self._inliner.shutdown(wait=False, cancel_futures=True)

    # -- internals ----------------------------------------------------------------------

    async def _call(
        self, operation: str, model: type[M], method: str, path: str, **kwargs: Any
    ) -> M:
        return await transport.call(
            self._client, self.breakers[operation], model, method, path, **kwargs
        )

    async def _pushed(self, compute_id: str) -> AsyncGenerator[TaskAnswer, None]:
        """The task's answers from its events stream, up to the terminal one.

        One "events" call for the breaker, counted when the stream ends (a failure only
        when it failed transiently).

        Raises:
            _NoPushError: the stream could not be opened, failed, or was not what it must be.
        """
        try:
            attempt = self.breakers["events"].attempt()
        except ComputeError as exc:  # the breaker is open
            raise _NoPushError(exc.message) from None
        try:
            async with self._events_client.stream(
                "GET",
                events_path(compute_id),
                headers={"accept": EVENTS_TYPE, "cache-control": "no-store"},
            ) as response:
                if response.status_code in _NO_EVENTS_ROUTE:
                    attempt.ended()  # the server answered: it has no events for this task
                    raise _NoPushError(f"the events call answered HTTP {response.status_code}")
                if response.status_code >= 300:
                    await response.aread()
                    raise transport.error_of(response)
                if transport.content_type(response) != EVENTS_TYPE:
                    kind = transport.content_type(response)[:40]
                    raise _malformed("events", f"content type {kind!r}, not {EVENTS_TYPE}")
                number = 0
                async for event in EventSource(response).aiter_sse():
                    if event.event != TASK_EVENT:
                        continue  # another kind of event, unknown here
                    number = _next_number(event.id, number)
                    answer = _event_answer(event.data, compute_id)
                    if answer.task_status in TASK_TERMINAL:
                        attempt.ended()
                    yield answer
                    if answer.task_status in TASK_TERMINAL:
                        return
                raise _malformed("events", "the stream ended before the task did")
        except httpx.HTTPError as exc:
            error = transport.transport_error(exc)
            attempt.ended(error)
            raise _NoPushError(error.message) from None
        except (ComputeError, SSEError) as exc:
            error = exc if isinstance(exc, ComputeError) else _malformed("events", str(exc))
            attempt.ended(error)
            raise _NoPushError(error.message) from None
        finally:
            attempt.abandoned()  # nothing when a verdict was given

    async def _task(self, operation: str, method: str, path: str, compute_id: str) -> TaskAnswer:
        """A call answering one task, which must be the task asked about."""
        answer = await self._call(operation, TaskAnswer, method, path, task=compute_id)
        if answer.id != compute_id:
            raise _malformed(operation, f"asked about task {compute_id}, answered another")
        return answer

    def _inline(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` with every ``artifact:`` input replaced by its bytes as a data URI."""
        total = 0

        def inline(value: str) -> str:
            nonlocal total
            if not value.startswith(_ARTIFACT_PREFIX):
                return value
            try:
                data = self._resolve(value)
            except FileNotFoundError:
                raise ComputeError(
                    ComputeErrorCategory.VALIDATION, f"input {value} is not stored here"
                ) from None
            except OSError as exc:  # the artifact storage, for now: worth another submit
                raise ComputeError(
                    ComputeErrorCategory.TRANSIENT, f"input {value} could not be read: {exc}"
                ) from None
            total += len(data)
            if total > self._inline_limit:
                raise ComputeError(
                    ComputeErrorCategory.VALIDATION,
                    f"the task's inputs exceed {self._inline_limit} bytes, the most sent "
                    "inline to a compute server",
                )
            return data_uri(data)

        result: dict[str, Any] = map_strings(params, inline)
        return result

    async def _snapshot(self, compute_id: str, answer: TaskAnswer) -> TaskSnapshot:
        status = answer.task_status
        outputs: tuple[OutputFile, ...] = ()
        if status is TaskStatus.COMPLETED:
            outputs = tuple(
                [await self._download(compute_id, item) for item in answer.output.items]
            )
        return TaskSnapshot(
            compute_id=compute_id,
            status=status,
            progress=answer.progress,
            outputs=outputs,
            error_category=answer.error_category,
            error_message=answer.error_message,
        )

    async def _download(self, compute_id: str, item: OutputItem) -> OutputFile:
        """Fetch, verify and probe one output.

        Raises:
            ComputeError: TRANSIENT when its URL, size, hash or content is not right.
        """
        where = f"output {item.url[-80:]!r} of task {compute_id}"
        outputs = re.escape(f"{task_path(compute_id)}/outputs/")
        if re.fullmatch(rf"{outputs}[0-9]{{1,4}}", item.url) is None:
            raise _malformed("status", f"{where}: not one of the task's output paths")
        if item.size > self._max_output_bytes:
            raise _malformed("status", f"{where}: {item.size} bytes announced, over the limit")
        data = await self.breakers["download"].call(lambda: self._fetch(compute_id, item))
        try:
            return await asyncio.to_thread(
                probed,
                data,
                seed=item.seed,
                notes=item.notes,
                recipe=item.recipe,
                max_bytes=self._max_output_bytes,
            )
        except InvalidMediaError as exc:
            raise ComputeError(
                ComputeErrorCategory.TRANSIENT,
                f"{where} failed verification: not a decodable image or video ({exc})",
            ) from None

    async def _fetch(self, compute_id: str, item: OutputItem) -> bytes:
        """The output's bytes, checked against its announced size and SHA-256 as they come."""
        where = f"output {item.url[-80:]!r} of task {compute_id}"
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        size = 0
        try:
            async with self._client.stream("GET", item.url) as response:
                if response.status_code == 404:
                    raise UnknownComputeTaskError(compute_id)
                if response.status_code >= 300:
                    await response.aread()
                    raise transport.error_of(response)
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > item.size:
                        raise _unverified(where, f"more than the {item.size} bytes announced")
                    digest.update(chunk)
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise transport.transport_error(exc) from exc
        if size != item.size:
            raise _unverified(where, f"{size} bytes where {item.size} were announced")
        if digest.hexdigest() != item.sha256:
            raise _unverified(where, "its SHA-256 is not the one announced")
        return b"".join(chunks)


def _next_number(given: str, previous: int) -> int:
    """An event's number, which must count up from the previous one's."""
    if not given.isascii() or not given.isdigit() or int(given) <= previous:
        raise _malformed("events", f"event number {given[:20]!r} after {previous}")
    return int(given)


def _event_answer(data: str, compute_id: str) -> TaskAnswer:
    """A task event's data as the answer about ``compute_id``."""
    try:
        answer = parse(TaskAnswer, data.encode())
    except WireFormatError as exc:
        raise _malformed("events", str(exc)) from None
    if answer.id != compute_id:
        raise _malformed("events", f"asked about task {compute_id}, answered another")
    return answer


def _malformed(operation: str, why: str) -> ComputeError:
    return ComputeError(ComputeErrorCategory.TRANSIENT, f"{operation}: malformed answer: {why}")


def _unverified(where: str, why: str) -> ComputeError:
    return ComputeError(ComputeErrorCategory.TRANSIENT, f"{where} failed verification: {why}")
