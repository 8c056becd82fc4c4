"""One wire call over HTTP: through its operation's breaker, every answer through the schema.

Shared by the HTTP compute adapter and the remote evaluator. Errors are mapped once onto
``ComputeError`` categories:

* no answer (refused, reset, timed out, cut short) and 5xx: TRANSIENT; 429: CAPACITY;
* 401/403: INTERNAL (this service's token is wrong: retrying cannot help);
* 404 on a task: ``UnknownComputeTaskError``;
* another 4xx: the server's ``error_category`` (VALIDATION when its body gives none);
* a 2xx answer that does not parse as the operation's model (not JSON, the wrong
  content type, not an object, a field missing or out of range, truncated, bit-flipped):
  TRANSIENT. Whatever mangled it may not mangle the next one, and the caller's retry
  budget bounds the wait. It never escapes as an exception of its own.
"""

from __future__ import annotations

import contextlib
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from server.compute.base import ComputeError, UnknownComputeTaskError
from server.compute.breaker import CircuitBreaker
from server.compute.wire import JSON_TYPE, ErrorBody, WireFormatError, parse
from server.domain.enums import ComputeErrorCategory

M = TypeVar("M", bound=BaseModel)


async def call(
    client: httpx.AsyncClient,
    breaker: CircuitBreaker,
    model: type[M],
    method: str,
    path: str,
    *,
    task: str = "",
    **kwargs: Any,
) -> M:
    """Send one request through ``breaker``; its answer as ``model``.

    Args:
        client: the pooled HTTP client.
        breaker: the breaker of this call's operation.
        model: what a successful answer must be.
        method: the HTTP method.
        path: the path (relative to the client's base URL).
        task: the compute id the path names, if any (a 404 then means "unknown task").
        **kwargs: passed to ``httpx.AsyncClient.request`` (json, params, headers).

    Raises:
        ComputeError: the mapped failure (see the module docstring).
    """

    async def send() -> M:
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(exc) from exc
        return answer(response, model, what=f"{method} {path}", task=task)

    return await breaker.call(send)


def answer(response: httpx.Response, model: type[M], *, what: str, task: str = "") -> M:
    """A read answer as ``model``, or the ``ComputeError`` it means.

    Raises:
        ComputeError: an error status, or a body that is not a valid ``model``.
    """
    if response.status_code == 404 and task:
        raise UnknownComputeTaskError(task)
    if response.status_code >= 300:
        raise error_of(response)
    if content_type(response) != JSON_TYPE:
        raise ComputeError(
            ComputeErrorCategory.TRANSIENT,
            f"{what}: malformed answer: content type {content_type(response)[:40]!r}, "
            f"not {JSON_TYPE}",
        )
    try:
        return parse(model, response.content)
    except WireFormatError as exc:
        raise ComputeError(
            ComputeErrorCategory.TRANSIENT, f"{what}: malformed answer: {exc}"
        ) from None


def content_type(response: httpx.Response) -> str:
    """The answer's media type, lower-cased, without parameters."""
    header: str = response.headers.get("content-type", "")
    return header.split(";", 1)[0].strip().lower()


def transport_error(exc: httpx.HTTPError) -> ComputeError:
    """No (whole) answer: refused, reset, timed out, cut short."""
    kind = type(exc).__name__
    return ComputeError(ComputeErrorCategory.TRANSIENT, f"compute server unreachable ({kind})")


def error_of(response: httpx.Response) -> ComputeError:
    """The ``ComputeError`` an error answer means (its body read leniently)."""
    body = ErrorBody()
    if content_type(response) == JSON_TYPE:
        # A mangled error body: the status code still says enough.
        with contextlib.suppress(WireFormatError):
            body = parse(ErrorBody, response.content)
    status = response.status_code
    message = body.error_message or f"HTTP {status}"
    if status >= 500 or status < 400:
        return ComputeError(ComputeErrorCategory.TRANSIENT, message)
    if status == 429:
        return ComputeError(ComputeErrorCategory.CAPACITY, message)
    if status in (401, 403):
        return ComputeError(
            ComputeErrorCategory.INTERNAL, f"the compute server refused this service: {message}"
        )
    return ComputeError(body.error_category or ComputeErrorCategory.VALIDATION, message)
