"""The domain error tree; the API layer maps each kind to one gRPC status.

DomainError
├── InvalidArgumentError      bad input; carries every offending field
├── NotFoundError             unknown id, or another tenant's
├── AlreadyExistsError        a request_id reused with a different request
├── FailedPreconditionError   a state change that is impossible now
├── ResourceExhaustedError    admission limits hit; carries a retry delay
├── UnimplementedError        a feature that is not available yet
└── IllegalTransitionError    a bug: a state machine was asked for a forbidden move

StartupError                  the service cannot start; the message tells the operator why
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One offending field of a request, named by its path in the request message."""

    field: str
    description: str


class DomainError(Exception):
    """Base of every error the domain raises on purpose.

    Attributes:
        reason: a stable UPPER_SNAKE identifier clients may switch on.
        message: a public message, safe to show to the caller.
    """

    reason = "DOMAIN_ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidArgumentError(DomainError):
    """The request is malformed; ``violations`` names every offending field."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        fields = ", ".join(v.field for v in violations)
        super().__init__(f"invalid request: {fields}")
        self.violations = violations


class NotFoundError(DomainError):
    """The resource does not exist or belongs to another tenant; ``field`` names the id(s)."""

    reason = "NOT_FOUND"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AlreadyExistsError(DomainError):
    """A request_id was reused with a different request."""

    reason = "REQUEST_ID_REUSED"


class FailedPreconditionError(DomainError):
    """The operation is impossible in the resource's current state."""

    reason = "FAILED_PRECONDITION"


class ResourceExhaustedError(DomainError):
    """Admission limits are hit; retrying after ``retry_after`` seconds may succeed."""

    reason = "QUEUE_FULL"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnimplementedError(DomainError):
    """The feature exists in the contract but is not available yet."""

    reason = "NOT_IMPLEMENTED"


class UnavailableError(DomainError):
    """The server cannot serve this now (e.g. it is shutting down); retrying helps."""

    reason = "UNAVAILABLE"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IllegalTransitionError(DomainError):
    """A forbidden state change was attempted: always a bug."""

    reason = "ILLEGAL_TRANSITION"


class StartupError(RuntimeError):
    """The service cannot start (bad database, port in use, ...); the message says why."""


class Violations:
    """Collects field violations so a request reports all its faults at once."""

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        """Record that ``field`` is wrong, and why."""
        self._items.append(FieldViolation(field, description))

    def __bool__(self) -> bool:
        return bool(self._items)

    def raise_if_any(self) -> None:
        """Raise InvalidArgumentError when anything was recorded.

        Raises:
            InvalidArgumentError: at least one violation was added.
        """
        if self._items:
            raise InvalidArgumentError(list(self._items))
