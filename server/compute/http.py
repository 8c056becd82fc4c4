"""The HTTP compute backend: the engine's adapter to a remote compute server (see ``wire``).

One pooled ``httpx.AsyncClient`` with per-call timeouts and a bearer token. Every call
goes through a circuit breaker; errors are mapped once onto ``ComputeError`` categories:
no answer (refused, reset, timed out) and 5xx are TRANSIENT, 429 is CAPACITY, a 4xx
carries the server's ``error_category`` (VALIDATION when it gives none), 401/403 are
INTERNAL (this service's token is wrong: retrying cannot help), a 404 on a task is
``UnknownComputeTaskError``. Retrying is the engine's business (``retry.RetryPolicy``),
so one policy covers submit, status and cancel for every backend.

A submit carries the task's idempotency key (body and ``Idempotency-Key`` header): a
retried submit whose first answer was lost finds the same remote task. Status is polled
with backoff between ``poll_min_s`` and ``poll_max_s``; outputs are downloaded when the
task completes. ``artifact:`` inputs go inline as ``data:`` URIs, up to
``inline_limit`` bytes per task (signed download links are not built).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from server.compute.base import (
    ComputeError,
    OutputFile,
    TaskRequest,
    TaskSnapshot,
    UnknownComputeTaskError,
)
from server.compute.breaker import CircuitBreaker
from server.compute.wire import STATUSES, TASKS_PATH, data_uri, map_strings
from server.domain.enums import ComputeErrorCategory, TaskStatus
from server.domain.states import TASK_TERMINAL

log = logging.getLogger(__name__)
_ARTIFACT_PREFIX = "artifact:"


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
        max_output_bytes: int = 512 * 1024 * 1024,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )
        self._resolve = resolve
        self._poll_min_s = poll_min_s
        self._poll_max_s = poll_max_s
        self._inline_limit = inline_limit
        self._max_output_bytes = max_output_bytes
        self.breaker = breaker or CircuitBreaker()

    async def submit(self, request: TaskRequest) -> str:
        """Create the remote task (or find the one this idempotency key created)."""
        parameters = await asyncio.to_thread(self._inline, request.params)
        body = {
            "task_type": request.task_type.value,
            "parameters": parameters,
            "idempotency_key": request.idempotency_key,
            "origin_organization": request.organization,
        }
        answer = await self._call(
            "POST", TASKS_PATH, json=body, headers={"idempotency-key": request.idempotency_key}
        )
        return str(answer["id"])

    async def watch(self, compute_id: str) -> AsyncIterator[TaskSnapshot]:
        """Poll the task, yielding a snapshot at each change, ending with the terminal one.

        Raises:
            UnknownComputeTaskError: the server does not know the task (any more).
            ComputeError: a poll failed (TRANSIENT when worth re-watching).
        """
        delay = self._poll_min_s
        last: tuple[TaskStatus, float] | None = None
        while True:
            answer = await self._call("GET", f"{TASKS_PATH}{compute_id}", task=compute_id)
            status = _status(answer)
            progress = float(answer.get("progress") or 0.0)
            if (status, progress) != last:
                last = (status, progress)
                delay = self._poll_min_s
                yield await self._snapshot(compute_id, status, progress, answer)
            if status in TASK_TERMINAL:
                return
            await asyncio.sleep(delay)
            delay = min(self._poll_max_s, delay * 1.5)

    async def cancel(self, compute_id: str) -> bool:
        """Ask the server to stop the task; True once it reports it terminal (or unknown)."""
        try:
            answer = await self._call("POST", f"{TASKS_PATH}{compute_id}/cancel", task=compute_id)
        except UnknownComputeTaskError:
            return True  # nothing there to release
        return _status(answer) in TASK_TERMINAL

    async def health(self) -> dict[str, Any]:
        """The server's health answer (status and capacity)."""
        return await self._call("GET", "/health")

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    # -- internals ----------------------------------------------------------------------

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

    async def _snapshot(
        self, compute_id: str, status: TaskStatus, progress: float, answer: dict[str, Any]
    ) -> TaskSnapshot:
        outputs: tuple[OutputFile, ...] = ()
        if status is TaskStatus.COMPLETED:
            output = answer.get("output") or {}
            items = [*(output.get("images") or []), *(output.get("videos") or [])]
            outputs = tuple([await self._download(compute_id, item) for item in items])
        return TaskSnapshot(
            compute_id=compute_id,
            status=status,
            progress=progress,
            outputs=outputs,
            error_category=answer.get("error_category"),
            error_message=answer.get("error_message"),
        )

    async def _download(self, compute_id: str, item: dict[str, Any]) -> OutputFile:
        url = str(item["url"])

        async def get() -> bytes:
            try:
                async with self._client.stream("GET", url) as response:
                    if response.status_code == 404:
                        raise UnknownComputeTaskError(compute_id)
                    if response.status_code >= 400:
                        await response.aread()
                        raise _error(response)
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > self._max_output_bytes:
                            raise ComputeError(
                                ComputeErrorCategory.INTERNAL,
                                f"output {url} is over {self._max_output_bytes} bytes",
                            )
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.HTTPError as exc:
                raise _transport_error(exc) from exc

        data = await self.breaker.call(get)
        duration = item.get("duration_s")
        return OutputFile(
            data=data,
            mime_type=str(item.get("mime_type") or "application/octet-stream"),
            width=int(item.get("width") or 0),
            height=int(item.get("height") or 0),
            seed=int(item.get("seed") or 0),
            duration_s=None if duration is None else float(duration),
            frame_count=int(item.get("frame_count") or 0),
            notes=tuple(str(n) for n in item.get("notes") or ()),
        )

    async def _call(
        self, method: str, path: str, *, task: str = "", **kwargs: Any
    ) -> dict[str, Any]:
        """One request through the breaker; its JSON answer, or the mapped error."""

        async def send() -> dict[str, Any]:
            try:
                response = await self._client.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                raise _transport_error(exc) from exc
            if response.status_code == 404 and task:
                raise UnknownComputeTaskError(task)
            if response.status_code >= 400:
                raise _error(response)
            try:
                answer: dict[str, Any] = response.json()
            except ValueError:
                raise ComputeError(
                    ComputeErrorCategory.TRANSIENT, f"{method} {path}: the answer is not JSON"
                ) from None
            return answer

        return await self.breaker.call(send)


def _status(answer: dict[str, Any]) -> TaskStatus:
    status = STATUSES.get(str(answer.get("status", "")).lower())
    if status is None:
        raise ComputeError(
            ComputeErrorCategory.INTERNAL, f"unknown task status {answer.get('status')!r}"
        )
    return status


def _transport_error(exc: httpx.HTTPError) -> ComputeError:
    kind = type(exc).__name__
    return ComputeError(ComputeErrorCategory.TRANSIENT, f"compute server unreachable ({kind})")


def _error(response: httpx.Response) -> ComputeError:
    """The ``ComputeError`` an error answer means."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    message = str(body.get("error_message") or f"HTTP {response.status_code}")
    status = response.status_code
    if status >= 500:
        return ComputeError(ComputeErrorCategory.TRANSIENT, message)
    if status == 429:
        return ComputeError(ComputeErrorCategory.CAPACITY, message)
    if status in (401, 403):
        return ComputeError(
            ComputeErrorCategory.INTERNAL, f"the compute server refused this service: {message}"
        )
    return ComputeError(body.get("error_category") or ComputeErrorCategory.VALIDATION, message)
