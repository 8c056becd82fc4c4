"""How the ``sartiq`` CLI fails: one line on stderr and a documented exit status.

Every failure becomes a ``CliError`` (what went wrong, where, and the exit status),
printed as ``sartiq: <what>: <why>``. ``describe`` maps the client's errors onto it;
``read_local`` turns a bad local path into one; ``is_reference`` tells a reference
from a local path, whatever the case of its scheme.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import grpc

from sartiq_grpc import errors

EXIT_FAILURE = 1  # anything not listed below
EXIT_USAGE = 2  # bad arguments, a bad local file, or a request the server found invalid
EXIT_NOT_FOUND = 3  # an id the server does not know (or one of another organization)
EXIT_AUTH = 4  # a missing, refused or expired key, or one without the scope needed
EXIT_UNAVAILABLE = 5  # the server cannot be reached, is shutting down, or says retry later

EXIT_STATUS_HELP = """\
Failures print one line on stderr, "sartiq: <what>: <why>", and exit with:
  1  any other failure (the server's INTERNAL, FAILED_PRECONDITION, ...)
  2  bad usage, a missing, unreadable or directory file argument, or a request the
     server refused as INVALID_ARGUMENT (every offending field is named)
  3  NOT_FOUND: an id the server does not know
  4  UNAUTHENTICATED or PERMISSION_DENIED: check --api-key / SARTIQ_API_KEY
  5  the server cannot be reached within --connect-timeout, or is UNAVAILABLE or
     RESOURCE_EXHAUSTED (retry later)
  130 interrupted (Ctrl-C)
Set SARTIQ_DEBUG=1 to see the traceback of an unexpected error.
"""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# A URI scheme ("http:", "ARTIFACT:"): letters first, then letters, digits, + - .
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):(//)?")
_OPAQUE_SCHEMES = ("prediction", "artifact")  # references without "//"


class CliError(Exception):
    """A failure the CLI reports as ``sartiq: <what>: <why>`` and exits ``status``."""

    def __init__(self, status: int, what: str, why: str, *, bare: bool = False) -> None:
        super().__init__(f"{what}: {why}")
        self.status = status
        self.what = what
        self.why = why
        self.bare = bare

    def line(self) -> str:
        """What is printed on stderr, control characters flattened to spaces.

        With ``bare`` it is ``why`` alone: a line that is whole already, or the end of
        one begun on a terminal (a "waiting ..." notice).
        """
        return one_line(self.why if self.bare else f"sartiq: {self.what}: {self.why}")


def one_line(text: str) -> str:
    """``text`` with every run of control characters (newlines too) made one space."""
    return _CONTROL.sub(" ", text).strip()


def is_reference(value: str) -> bool:
    """Whether a command line image argument is a reference rather than a local path.

    A value with a URI scheme followed by ``//`` (``HTTP://host/a.png``, ``file:///x``)
    or one of the service's opaque schemes (``prediction:``, ``artifact:``) is a
    reference; scheme case never matters (RFC 3986). Prefix ``./`` to name a local
    file that looks like one.
    """
    match = _SCHEME.match(value)
    if match is None:
        return False
    return bool(match.group(2)) or match.group(1).lower() in _OPAQUE_SCHEMES


def normalize_reference(value: str) -> str:
    """A reference with its scheme in lower case (the canonical form); else ``value``."""
    match = _SCHEME.match(value)
    if match is None or not is_reference(value):
        return value
    return match.group(1).lower() + value[len(match.group(1)) :]


def read_local(path: str | Path) -> bytes:
    """The bytes of a local file the user named.

    Raises:
        CliError: the path is missing, a directory, unreadable, or otherwise
            unusable; ``what`` is the path, ``why`` says which.
    """
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise local_failure(path, exc) from None


def local_failure(path: str | Path, exc: OSError) -> CliError:
    """The failure for an OSError on a path the user named (exit 2 when it is theirs)."""
    reasons = {
        errno.ENOENT: "no such file",
        errno.EISDIR: "is a directory, not a file",
        errno.ENOTDIR: "a part of the path is not a directory",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EEXIST: "exists and is not a directory",
    }
    why = reasons.get(exc.errno or 0)
    if why is None:
        return CliError(EXIT_FAILURE, str(path), exc.strerror or type(exc).__name__)
    return CliError(EXIT_USAGE, str(path), why)


def describe(error: errors.SartiqError, target: str) -> CliError:
    """The failure to report for a client error from the server at ``target``."""
    if isinstance(error, errors.TransportError):
        return CliError(EXIT_UNAVAILABLE, target, str(error))
    assert isinstance(error, errors.ApiError)
    code = error.code
    if isinstance(error, errors.InvalidArgumentError) and error.violations:
        named = "; ".join(f"{field}: {why}" for field, why in sorted(error.violations.items()))
        return CliError(EXIT_USAGE, "invalid request", named)
    if isinstance(error, errors.NotFoundError) and error.ids:
        named = ", ".join(f"{field}={value}" for field, value in sorted(error.ids.items()))
        return CliError(EXIT_NOT_FOUND, "not found", named)
    why = f"{code.name}: {error.message or 'no message'}"
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return CliError(EXIT_AUTH, target, f"{why} (check --api-key or SARTIQ_API_KEY)")
    if isinstance(error, errors.ResourceExhaustedError) and error.retry_after is not None:
        why += f" (retry in {error.retry_after:g} s)"
    if isinstance(error, errors.InternalError) and error.correlation_id:
        why += f" (correlation id {error.correlation_id})"
    return CliError(_STATUS_BY_CODE.get(code, EXIT_FAILURE), target, why)


_STATUS_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_USAGE,
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
}
