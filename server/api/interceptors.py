"""The server interceptor: authentication, a request id and one structured log line per call.

A servicer context is only valid while its call is live. After a client cancels, grpc
tears the call down, and some context methods (``peer()``, ``auth_context()``) then
dereference freed memory and kill the process. So everything a log line needs is read
before the handler runs, and a stream's generator is closed by the handler itself (never
left to the garbage collector, which would run its cleanup after the call is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.api.auth import Authenticator
from server.api.context import REQUEST_ID_HEADER, CallContext, bind, unbind
from server.api.errors import abort_with
from server.domain.errors import InvalidArgumentError, ResourceExhaustedError
from server.domain.ids import IdSource
from server.domain.limits import RateLimiter

log = logging.getLogger("sartiq.access")

_VALID_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

Context = grpc.aio.ServicerContext[Any, Any]
Behavior = Callable[[Any, Context], Any]


def _request_id(metadata: tuple[tuple[str, Any], ...], ids: IdSource) -> str:
    for key, value in metadata:
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _VALID_ID.fullmatch(value):
            return value
    return ids.hex()


class _CallLog:
    """Authenticates one call, binds its context, times it and logs its outcome.

    Reads the context only while the call is live: on entry, and on exit unless the
    call was cancelled (a cancelled call's context may already be torn down).
    """

    def __init__(
        self,
        method: str,
        context: Context,
        auth: Authenticator | None,
        ids: IdSource,
        *,
        streaming: bool,
        limits: RateLimiter | None = None,
    ) -> None:
        self.method = method
        self.streaming = streaming
        self.context = context
        # Read once: grpc decodes the metadata on every read, and logs each value that is
        # not UTF-8 each time.
        self.metadata = tuple(context.invocation_metadata() or ())
        self.request_id = _request_id(self.metadata, ids)
        self.peer = context.peer()
        self.auth = auth
        self.limits = limits
        self.start = time.perf_counter()

    async def __aenter__(self) -> _CallLog:
        organization = ""
        self.problem: Exception | None = None
        if self.auth is not None:
            try:
                principal = self.auth.principal(self.metadata)
                self.auth.authorize(principal, self.method)
                organization = principal.organization
                if self.limits is not None:
                    wait = await self.limits.take(organization)
                    if wait:
                        raise ResourceExhaustedError(
                            "this organization calls faster than the server allows",
                            retry_after=wait,
                            reason="RATE_LIMITED",
                        )
            except Exception as exc:
                # UNAUTHENTICATED, PERMISSION_DENIED or RESOURCE_EXHAUSTED; anything else
                # is a bug and ends the call INTERNAL with a correlation id, never UNKNOWN.
                self.problem = exc
        self.token = bind(CallContext(self.request_id, organization))
        echo = ((REQUEST_ID_HEADER, self.request_id),)
        if self.streaming:
            # A stream's client wants it before the stream ends, in the initial metadata.
            await self.context.send_initial_metadata(echo)
        else:
            # A unary answer carries it in its trailing metadata, which travels with the
            # status: no extra send for the call.
            self.context.set_trailing_metadata(echo)
        return self

    async def admit(self) -> None:
        """End the call unless it passed authentication and holds the scope it needs."""
        if self.problem is not None:
            await abort_with(self.context, self.problem)

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        log.info(
            "rpc",
            extra={
                "rpc_method": self.method,
                "code": self._code(exc_type).name,
                "duration_ms": round((time.perf_counter() - self.start) * 1000, 3),
                "request_id": self.request_id,
                "peer": self.peer,
            },
        )
        unbind(self.token)

    def _code(self, exc_type: type[BaseException] | None) -> grpc.StatusCode:
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError | GeneratorExit):
            return grpc.StatusCode.CANCELLED  # the context must not be touched now
        code = self.context.code()
        if isinstance(code, grpc.StatusCode):
            return code
        if exc_type is None or issubclass(exc_type, grpc.aio.AbortError):
            return grpc.StatusCode.OK
        return grpc.StatusCode.UNKNOWN  # what grpc answers for an unhandled exception


async def _write_all(items: AsyncGenerator[Any, None], context: Context) -> None:
    """Send every item of a response stream, closing the stream whatever happens."""
    async with contextlib.aclosing(items):
        async for item in items:
            await context.write(item)


def _wrap_unary_response(
    method: str,
    behavior: Behavior,
    auth: Authenticator | None,
    ids: IdSource,
    limits: RateLimiter | None,
) -> Behavior:
    """Wrap a handler that returns one response (unary-unary, stream-unary)."""

    async def wrapped(request: Any, context: Context) -> Any:
        async with _CallLog(method, context, auth, ids, streaming=False, limits=limits) as call:
            await call.admit()
            return await behavior(request, context)

    return wrapped


def _wrap_stream_response(
    method: str,
    behavior: Behavior,
    auth: Authenticator | None,
    ids: IdSource,
    limits: RateLimiter | None,
) -> Behavior:
    """Wrap a handler that streams responses, as a coroutine that writes them itself."""

    async def wrapped(request: Any, context: Context) -> None:
        async with _CallLog(method, context, auth, ids, streaming=True, limits=limits) as call:
            await call.admit()
            result = behavior(request, context)
            if isinstance(result, AsyncGenerator):
                await _write_all(result, context)
            else:  # a handler that writes through the context (the health Watch)
                await result

    return wrapped


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates each call, binds its request id and organization, and logs it.

    The request id is the caller's ``x-request-id`` or a new one. Methods of the
    services in ``open_services`` (health, reflection) need no credentials.
    """

    def __init__(
        self,
        auth: Authenticator,
        *,
        open_services: frozenset[str],
        limits: RateLimiter | None = None,
    ) -> None:
        self._auth = auth
        self._limits = limits
        self._open = open_services
        self._ids = IdSource()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        """Wrap every kind of handler; unknown methods pass through."""
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        service = method.removeprefix("/").partition("/")[0]
        auth = None if service in self._open else self._auth
        # Requests arrive as bytes and are parsed here, so a message that does not decode
        # is INVALID_ARGUMENT with a BadRequest, not grpc's UNKNOWN.
        parse = handler.request_deserializer
        codec = {"request_deserializer": None, "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            behavior = _parsing_unary(handler.unary_unary, parse)
            wrapped = _wrap_unary_response(method, behavior, auth, self._ids, self._limits)
            return grpc.unary_unary_rpc_method_handler(wrapped, **codec)
        if handler.unary_stream is not None:
            behavior = _parsing_unary(handler.unary_stream, parse)
            wrapped = _wrap_stream_response(method, behavior, auth, self._ids, self._limits)
            return grpc.unary_stream_rpc_method_handler(wrapped, **codec)
        if handler.stream_unary is not None:
            behavior = _parsing_stream(handler.stream_unary, parse)
            wrapped = _wrap_unary_response(method, behavior, auth, self._ids, self._limits)
            return grpc.stream_unary_rpc_method_handler(wrapped, **codec)
        behavior = _parsing_stream(handler.stream_stream, parse)
        wrapped = _wrap_stream_response(method, behavior, auth, self._ids, self._limits)
        return grpc.stream_stream_rpc_method_handler(wrapped, **codec)


def _decoded(parse: Callable[[bytes], Any] | None, data: Any) -> Any:
    """The request message of ``data``.

    Raises:
        InvalidArgumentError: the bytes are not a valid message of the method's type.
    """
    if parse is None or not isinstance(data, bytes):
        return data
    try:
        return parse(data)
    except Exception as exc:  # DecodeError, or a RuntimeError for invalid UTF-8
        reason = type(exc).__name__
        raise InvalidArgumentError.of(
            "request", f"is not a valid message of this method's request type ({reason})"
        ) from None


def _parsing_unary(behavior: Behavior, parse: Callable[[bytes], Any] | None) -> Behavior:
    """A handler taking one request, parsed first (an undecodable one ends the call)."""

    def handle(request: Any, context: Context) -> Any:
        try:
            message = _decoded(parse, request)
        except InvalidArgumentError as exc:
            return _refuse(context, exc)
        return behavior(message, context)

    return handle


def _parsing_stream(behavior: Behavior, parse: Callable[[bytes], Any] | None) -> Behavior:
    """A handler taking a request stream, each message parsed as it is read."""

    def handle(requests: AsyncIterator[Any], context: Context) -> Any:
        async def parsed() -> AsyncIterator[Any]:
            async for item in requests:
                yield _decoded(parse, item)

        return behavior(parsed(), context)

    return handle


async def _refuse(context: Context, error: InvalidArgumentError) -> None:
    await abort_with(context, error)
