"""The domain error tree; the API layer maps each kind to one gRPC status.

DomainError
├── InvalidArgumentError      bad input; carries every offending field
├── NotFoundError             unknown id, or another tenant's
├── AlreadyExistsError        a request_id reused with a different request
├── FailedPreconditionError   a state change that is impossible now
├── ResourceExhaustedError    admission limits hit; carries a retry delay
├── UnimplementedError        a feature that is not available yet
├── UnauthenticatedError      no valid token
├── PermissionDeniedError     a valid token without the scope a call needs
├── UnavailableError          shutting down; retry elsewhere
└── IllegalTransitionError    a bug: a state machine was asked for a forbidden move

StartupError                  the service cannot start; the message tells the operator why
"""

from __future__ import annotations

from collections.abc import Iterable
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
        metadata: machine-readable context for ``ErrorInfo.metadata``.
    """

    reason = "DOMAIN_ERROR"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})
        if reason is not None:
            self.reason = reason


class InvalidArgumentError(DomainError):
    """The request is malformed; ``violations`` names every offending field."""

    reason = "INVALID_ARGUMENT"

    @classmethod
    def of(cls, field: str, description: str) -> InvalidArgumentError:
        """The error for a single offending field."""
        return cls([FieldViolation(field, description)])

    def __init__(self, violations: list[FieldViolation]) -> None:
        fields = ", ".join(v.field for v in violations[:3])
        more = f" and {len(violations) - 3} more" if len(violations) > 3 else ""
        super().__init__(f"invalid request: {fields}{more}")
        self.violations = violations


class NotFoundError(DomainError):
    """Unknown ids, or another tenant's; ``metadata`` maps each field path to its id."""

    reason = "NOT_FOUND"

    @classmethod
    def of(cls, what: str, ids: dict[str, str]) -> NotFoundError:
        """The error for ``what`` (e.g. "generation") and the unknown ids by field path."""
        shown = {path: excerpt(value) for path, value in ids.items()}
        names = ", ".join(f"{path}={value!r}" for path, value in shown.items())
        return cls(f"{what} not found: {names}", metadata=shown)


class AlreadyExistsError(DomainError):
    """A request_id was reused with a different request."""

    reason = "REQUEST_ID_REUSED"

    def __init__(self, message: str, *, request_id: str) -> None:
        super().__init__(message, metadata={"request_id": excerpt(request_id)})


class FailedPreconditionError(DomainError):
    """The operation is impossible in the current state of what ``field`` refers to."""

    reason = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message, metadata={"field": field})


class ResourceExhaustedError(DomainError):
    """Admission limits are hit; retrying after ``retry_after`` seconds may succeed."""

    reason = "QUEUE_FULL"

    def __init__(self, message: str, *, retry_after: float, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class UnimplementedError(DomainError):
    """A feature of the contract this server does not run; ``feature`` names it."""

    reason = "NOT_IMPLEMENTED"

    def __init__(self, message: str, *, feature: str) -> None:
        super().__init__(message, metadata={"feature": feature})


class UnauthenticatedError(DomainError):
    """The call needs a valid token and has none."""

    reason = "UNAUTHENTICATED"


class PermissionDeniedError(DomainError):
    """The caller is known but lacks the scope the call needs."""

    reason = "PERMISSION_DENIED"


class UnavailableError(DomainError):
    """The server cannot serve this now (it is shutting down); retrying elsewhere helps."""

    reason = "SHUTTING_DOWN"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ArtifactStorageUnavailableError(UnavailableError):
    """Artifact storage cannot be reached (or is overloaded) now; retrying later helps."""

    reason = "STORAGE_UNAVAILABLE"

    def __init__(self, *, retry_after: float = 1.0) -> None:
        super().__init__("artifact storage is unavailable; retry later", retry_after=retry_after)


class IllegalTransitionError(DomainError):
    """A forbidden state change was attempted: always a bug."""

    reason = "ILLEGAL_TRANSITION"


class StartupError(RuntimeError):
    """The service cannot start (bad database, port in use, ...); the message says why."""


EXCERPT_CHARS = 64


def _escape(value: str, quote: str = "") -> str:
    """Backslash-escape backslashes, ``quote`` and every non-printable character."""
    out = []
    for char in value:
        if char == "\\" or char == quote:
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def excerpt(value: str, limit: int = EXCERPT_CHARS) -> str:
    """A short, escaped excerpt of caller input, safe to echo in an error."""
    if len(value) > limit:
        return _escape(value[:limit]) + "..."
    return _escape(value)


def key_path(field: str, key: str) -> str:
    """The AIP field path of a map entry: ``field["key"]``, quotes and backslashes escaped.

    Long keys are cut to an excerpt (marked with "...") so the path stays short.
    """
    text = key if len(key) <= EXCERPT_CHARS else key[:EXCERPT_CHARS]
    suffix = "" if text is key else "..."
    return f'{field}["{_escape(text, quote=chr(34))}{suffix}"]'


class Violations:
    """Collects field violations so a request reports all its faults at once."""

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        """Record that ``field`` is wrong, and why."""
        self._items.append(FieldViolation(field, description))

    def __bool__(self) -> bool:
        return bool(self._items)

    @property
    def items(self) -> list[FieldViolation]:
        """What was recorded so far, in order."""
        return list(self._items)

    def extend(self, violations: Iterable[FieldViolation]) -> None:
        """Record violations found elsewhere (e.g. while decoding the request)."""
        self._items.extend(violations)

    def raise_if_any(self) -> None:
        """Raise InvalidArgumentError when anything was recorded.

        Raises:
            InvalidArgumentError: at least one violation was added.
        """
        if self._items:
            raise InvalidArgumentError(list(self._items))
