"""Opaque page tokens over a (created_at desc, id desc) order, bound to the query they serve."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from server.domain.errors import Violations


@dataclass(frozen=True, slots=True)
class Cursor:
    """Position just after the last item of a page."""

    created_at: datetime
    id: str


def query_key(*parts: object) -> str:
    """A short digest of the query a token belongs to."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def encode_token(cursor: Cursor, key: str) -> str:
    """An opaque token for the page after ``cursor``."""
    body = {"t": cursor.created_at.isoformat(), "id": cursor.id, "k": key}
    return base64.urlsafe_b64encode(json.dumps(body).encode()).decode()


def decode_token(token: str, key: str, v: Violations) -> Cursor | None:
    """The cursor in ``token``; records a ``page_token`` violation when it is not valid here."""
    if not token:
        return None
    try:
        body = json.loads(base64.urlsafe_b64decode(token.encode()))
        cursor = Cursor(datetime.fromisoformat(body["t"]), str(body["id"]))
        same_query = body["k"] == key
    except (ValueError, KeyError, TypeError, binascii.Error):
        v.add("page_token", "is not a token this service issued")
        return None
    if not same_query:
        v.add("page_token", "was issued for a different filter")
        return None
    return cursor


def check_page_size(v: Violations, page_size: int, maximum: int) -> None:
    """Record a ``page_size`` violation unless it lies in 0..maximum."""
    if not 0 <= page_size <= maximum:
        v.add("page_size", f"must be between 0 and {maximum}, got {page_size}")


class Pageable(Protocol):
    """What a listed row needs for the (created_at desc, id desc) order."""

    @property
    def created_at(self) -> datetime:
        """When the row was created."""
        ...

    @property
    def id(self) -> str:
        """The row's id, the tie-breaker."""
        ...


T = TypeVar("T", bound=Pageable)


async def paginate(
    fetch: Callable[[Cursor | None, int], Awaitable[Sequence[T]]],
    *,
    page_size: int,
    page_token: str,
    key: str,
    default_size: int,
    max_size: int,
) -> tuple[Sequence[T], str]:
    """One page from ``fetch(cursor, limit)`` and the token of the next ("" on the last).

    Raises:
        InvalidArgumentError: a bad page size, or a token this query did not issue.
    """
    v = Violations()
    check_page_size(v, page_size, max_size)
    cursor = decode_token(page_token, key, v)
    v.raise_if_any()
    limit = page_size or default_size
    rows = await fetch(cursor, limit + 1)  # one extra row tells whether a next page exists
    items = rows[:limit]
    if len(rows) <= limit:
        return items, ""
    return items, encode_token(Cursor(items[-1].created_at, items[-1].id), key)
