"""Per-call context: the request id for logs and the caller's organization."""

from __future__ import annotations

import contextvars

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def current_request_id() -> str:
    """The id of the call being served, or "-" outside of one."""
    return _request_id.get()


def set_request_id(value: str) -> contextvars.Token[str]:
    """Bind ``value`` as the current call's request id."""
    return _request_id.set(value)


def reset_request_id(token: contextvars.Token[str]) -> None:
    """Restore the request id bound before ``set_request_id``."""
    _request_id.reset(token)
