"""The errors the Python client raises, one class per way a call can fail.

SartiqError
├── TransportError          the server could not be reached, or kept going away
└── ApiError                the server answered with an error status
    ├── InvalidArgumentError     ``violations``: every offending field and why
    ├── NotFoundError            ``ids``: each unknown id by field path
    ├── AlreadyExistsError       a request_id reused with a different request
    ├── FailedPreconditionError  a referenced resource is not in a usable state
    ├── ResourceExhaustedError   admission limits; ``retry_after`` seconds, when given
    ├── UnimplementedError       ``feature``: what this server does not run
    ├── UnauthenticatedError     a token is required and missing or unknown
    ├── PermissionDeniedError    the token may not do this
    ├── UnavailableError         the server is shutting down; retry elsewhere
    └── InternalError            ``correlation_id`` matches the server's log

Every ``ApiError`` carries the gRPC ``code``, the stable ``reason`` and ``metadata`` of its
``google.rpc.ErrorInfo``, and the human ``message``.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS = "grpc-status-details-bin"


class SartiqError(Exception):
    """Base of every error the client raises."""


class TransportError(SartiqError):
    """The server could not be reached, or the connection kept breaking."""


class ApiError(SartiqError):
    """The server answered a call with an error status."""

    def __init__(
        self, code: grpc.StatusCode, message: str, reason: str, metadata: dict[str, str]
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata


class InvalidArgumentError(ApiError):
    """The request was malformed; ``violations`` maps each offending field to why."""

    violations: dict[str, str]


class NotFoundError(ApiError):
    """Unknown ids (or another organization's); ``ids`` maps field paths to them."""

    @property
    def ids(self) -> dict[str, str]:
        """The unknown ids by field path."""
        return self.metadata


class AlreadyExistsError(ApiError):
    """The request_id was used for a different request."""


class FailedPreconditionError(ApiError):
    """A referenced resource is not in a state that allows the call."""


class ResourceExhaustedError(ApiError):
    """Admission limits were hit; retry after ``retry_after`` seconds."""

    retry_after: float | None


class UnimplementedError(ApiError):
    """The server does not run this feature (see ``GetCapabilities``)."""

    @property
    def feature(self) -> str:
        """The feature, e.g. ``STRATEGY_EDITING``."""
        return self.metadata.get("feature", "")


class UnauthenticatedError(ApiError):
    """A token is required and is missing or unknown."""


class PermissionDeniedError(ApiError):
    """The token does not allow this call."""


class UnavailableError(ApiError):
    """The server is shutting down (or the transport failed); retrying may succeed."""


class InternalError(ApiError):
    """An unexpected server error; quote ``correlation_id`` to its operators."""

    correlation_id: str


_CLASSES: dict[grpc.StatusCode, type[ApiError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def _details(error: grpc.aio.AioRpcError) -> list[Any]:
    trailers: Any = error.trailing_metadata() or ()
    for key, value in trailers:
        if key == STATUS_DETAILS and isinstance(value, bytes):
            return list(status_pb2.Status.FromString(value).details)
    return []


def from_rpc_error(error: grpc.aio.AioRpcError) -> ApiError:
    """The client error for a failed call, its rich details decoded."""
    code = error.code()
    kind = _CLASSES.get(code, ApiError)
    reason, metadata = "", {}
    violations: dict[str, str] = {}
    retry_after: float | None = None
    correlation_id = ""
    for detail in _details(error):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = {v.field: v.description for v in bad.field_violations}
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToTimedelta().total_seconds()
        elif detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
            request = error_details_pb2.RequestInfo()
            detail.Unpack(request)
            correlation_id = request.request_id
    result = kind(code, error.details() or "", reason, metadata)
    if isinstance(result, InvalidArgumentError):
        result.violations = violations
    if isinstance(result, ResourceExhaustedError):
        result.retry_after = retry_after
    if isinstance(result, InternalError):
        result.correlation_id = correlation_id
    return result
