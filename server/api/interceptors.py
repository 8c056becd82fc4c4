"""Server interceptors: a request id for every call, and one structured log line per call."""

from __future__ import annotations

import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.api.context import reset_request_id, set_request_id

log = logging.getLogger("sartiq.access")

REQUEST_ID_HEADER = "x-request-id"
_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

Context = grpc.aio.ServicerContext[Any, Any]


def _request_id(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _VALID_ID.match(value):
            return value
    return uuid.uuid4().hex


class _CallLog:
    """Times one call and logs its outcome with the request id bound."""

    def __init__(self, method: str, context: Context) -> None:
        self.method = method
        self.context = context
        self.request_id = _request_id(context)
        self.start = time.perf_counter()

    async def __aenter__(self) -> _CallLog:
        self.token = set_request_id(self.request_id)
        await self.context.send_initial_metadata(((REQUEST_ID_HEADER, self.request_id),))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        code = self.context.code() or grpc.StatusCode.OK
        if exc_type is not None and code == grpc.StatusCode.OK:
            code = grpc.StatusCode.CANCELLED if exc_type.__name__ == "CancelledError" else code
        log.info(
            "rpc",
            extra={
                "rpc_method": self.method,
                "code": getattr(code, "name", str(code)),
                "duration_ms": round((time.perf_counter() - self.start) * 1000, 3),
                "request_id": self.request_id,
                "peer": self.context.peer(),
            },
        )
        reset_request_id(self.token)


def _wrap_unary(
    method: str, behavior: Callable[[Any, Context], Awaitable[Any]]
) -> Callable[[Any, Context], Awaitable[Any]]:
    async def wrapped(request: Any, context: Context) -> Any:
        async with _CallLog(method, context):
            return await behavior(request, context)

    return wrapped


def _wrap_stream(
    method: str, behavior: Callable[[Any, Context], AsyncIterator[Any]]
) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
        async with _CallLog(method, context):
            async for item in behavior(request, context):
                yield item

    return wrapped


class RequestIdInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Binds a request id (the caller's ``x-request-id`` or a new one) and logs each call."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        """Wrap unary-unary and unary-stream handlers; others pass through."""
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream
            # Some handlers (the health Watch) write through the context instead of yielding.
            wrap = _wrap_stream if inspect.isasyncgenfunction(stream) else _wrap_unary
            return grpc.unary_stream_rpc_method_handler(
                wrap(method, stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
