"""One place that turns domain errors into gRPC statuses with google.rpc details.

Unexpected exceptions become INTERNAL with a generic message; the detail goes to the
log under the call's request id, which the client also receives as the correlation id.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from server.api.context import REQUEST_ID_HEADER, current_request_id
from server.domain import errors
from server.domain.model import ERROR_DOMAIN

log = logging.getLogger(__name__)


_CODES: dict[type[errors.DomainError], grpc.StatusCode] = {
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UnimplementedError: grpc.StatusCode.UNIMPLEMENTED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
}


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_for(error: errors.DomainError) -> tuple[grpc.StatusCode, status_pb2.Status]:
    """The gRPC code and the rich status describing ``error``."""
    code = next(
        (c for kind, c in _CODES.items() if isinstance(error, kind)), grpc.StatusCode.INTERNAL
    )
    details: list[any_pb2.Any] = []
    if isinstance(error, errors.InvalidArgumentError):
        details.append(_pack(_bad_request(error.violations)))
    details.append(
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata
            )
        )
    )
    if isinstance(error, errors.ResourceExhaustedError | errors.UnavailableError):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after * 1000))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    message = error.message
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + "..."
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return code, status


# The whole status travels in one trailer, which clients refuse past 8-16 KiB: the field
# violations get a budget of bytes, then one last entry says how many more there were.
MAX_MESSAGE_CHARS = 512
VIOLATIONS_BUDGET = 4096
_FIELD_CHARS = 160
_DESCRIPTION_CHARS = 300


def _bad_request(violations: list[errors.FieldViolation]) -> error_details_pb2.BadRequest:
    """The BadRequest of ``violations``, cut to the byte budget."""
    bad = error_details_pb2.BadRequest()
    used = 0
    for index, violation in enumerate(violations):
        field = violation.field[:_FIELD_CHARS]
        description = violation.description[:_DESCRIPTION_CHARS]
        size = len(field.encode()) + len(description.encode()) + 8
        if used + size > VIOLATIONS_BUDGET and index:
            rest = len(violations) - index
            bad.field_violations.add(
                field=field, description=f"{description} (and {rest - 1} more not shown)"
            )
            break
        used += size
        bad.field_violations.add(field=field, description=description)
    return bad


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End the call with the status for ``exc`` (INTERNAL for anything unexpected).

    Raises:
        grpc.aio.AbortError: always, as ``context.abort`` does.
    """
    if isinstance(exc, errors.DomainError) and not isinstance(exc, errors.IllegalTransitionError):
        code, status = status_for(exc)
    else:
        request_id = current_request_id()
        log.error("unexpected error (request id %s)", request_id, exc_info=exc)
        code = grpc.StatusCode.INTERNAL
        status = status_pb2.Status(
            code=code_pb2.INTERNAL,
            message=f"internal error; correlation id {request_id}",
            details=[
                _pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN)),
                _pack(error_details_pb2.RequestInfo(request_id=request_id)),
            ],
        )
    await context.abort(
        code,
        status.message,
        trailing_metadata=(
            ("grpc-status-details-bin", status.SerializeToString()),
            (REQUEST_ID_HEADER, current_request_id()),
        ),
    )
    raise AssertionError("context.abort returned")  # pragma: no cover


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Servicer = TypeVar("Servicer")
Context = grpc.aio.ServicerContext[Any, Any]


def unary(
    method: Callable[[Servicer, Req, Context], Awaitable[Resp]],
) -> Callable[[Servicer, Req, Context], Awaitable[Resp]]:
    """Map every exception a unary method raises to a proper status."""

    @functools.wraps(method)
    async def wrapper(self: Servicer, request: Req, context: Context) -> Resp:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # the method ended the call itself; aborting again would fail
        except Exception as exc:
            await abort_with(context, exc)

    return wrapper


def streaming(
    method: Callable[[Servicer, Req, Context], AsyncGenerator[Resp, None]],
) -> Callable[[Servicer, Req, Context], AsyncGenerator[Resp, None]]:
    """Map every exception a server-streaming method raises to a proper status."""

    @functools.wraps(method)
    async def wrapper(self: Servicer, request: Req, context: Context) -> AsyncGenerator[Resp, None]:
        try:
            # Closed here, not by the garbage collector, once the stream ends for any reason.
            async with contextlib.aclosing(method(self, request, context)) as items:
                async for item in items:
                    yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc)

    return wrapper
