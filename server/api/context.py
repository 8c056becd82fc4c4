"""Per-call context: the request id for logs and the caller's organization."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

# Call metadata carrying the id that correlates a call with the server's log lines.
REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True, slots=True)
class CallContext:
    """What the interceptor learned about the call being served."""

    request_id: str
    organization: str


_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("call", default=None)


def current_request_id() -> str:
    """The id of the call being served, or "-" outside of one."""
    call = _current.get()
    return "-" if call is None else call.request_id


def current_organization() -> str:
    """The organization the call being served acts for.

    Raises:
        RuntimeError: outside a call that passed authentication (a wiring bug).
    """
    call = _current.get()
    if call is None or not call.organization:
        raise RuntimeError("no authenticated call in this context")
    return call.organization


def bind(call: CallContext) -> contextvars.Token[CallContext | None]:
    """Make ``call`` the current call."""
    return _current.set(call)


def unbind(token: contextvars.Token[CallContext | None]) -> None:
    """Restore the call bound before ``bind``."""
    _current.reset(token)
