"""Signed page tokens over a (created_at desc, id desc) order, bound to the query they serve."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
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


class PageTokens:
    """Signs page tokens and checks them before reading anything inside.

    A token is ``base64url(JSON body) "." base64url(HMAC-SHA256(body))`` of at most
    ``MAX_LENGTH`` characters. A token that is too long, malformed or not signed with
    this service's secret is refused before its body is parsed, so no crafted body
    (deep nesting, impossible dates) ever reaches the JSON or date parsers.
    """

    MAX_LENGTH = 512

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the page token secret must have at least 16 bytes")
        self._secret = secret

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body, hashlib.sha256).digest()

    def encode(self, cursor: Cursor, key: str) -> str:
        """An opaque token for the page after ``cursor`` of the query ``key``."""
        body = json.dumps(
            {"t": cursor.created_at.isoformat(), "id": cursor.id, "k": key},
            separators=(",", ":"),
        ).encode()
        return f"{_b64(body)}.{_b64(self._mac(body))}"

    def decode(self, token: str, key: str | None, v: Violations) -> Cursor | None:
        """The cursor in ``token``; records a ``page_token`` violation when it is not valid here.

        ``key`` None means the query itself is invalid: then only whether the token is
        one this service issued is checked, not which query it was issued for.
        """
        if not token:
            return None
        body = self._verified(token)
        if body is None:
            v.add("page_token", "is not a token this service issued")
            return None
        try:
            fields = json.loads(body)
            cursor = Cursor(datetime.fromisoformat(fields["t"]), str(fields["id"]))
            same_query = fields["k"] == key
        except (ValueError, KeyError, TypeError):  # pragma: no cover - we signed it
            v.add("page_token", "is not a token this service issued")
            return None
        if key is not None and not same_query:
            v.add("page_token", "was issued for a different filter")
            return None
        return cursor

    def _verified(self, token: str) -> bytes | None:
        if len(token) > self.MAX_LENGTH or not token.isascii():
            return None
        body_text, dot, mac_text = token.partition(".")
        if not dot:
            return None
        try:
            body = base64.urlsafe_b64decode(_padded(body_text))
            mac = base64.urlsafe_b64decode(_padded(mac_text))
        except (ValueError, binascii.Error):
            return None
        return body if hmac.compare_digest(mac, self._mac(body)) else None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _padded(text: str) -> bytes:
    return (text + "=" * (-len(text) % 4)).encode()


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
    tokens: PageTokens,
    default_size: int,
    max_size: int,
    violations: Violations | None = None,
) -> tuple[Sequence[T], str]:
    """One page from ``fetch(cursor, limit)`` and the token of the next ("" on the last).

    ``violations`` holds what the caller found wrong with the rest of the request: they
    are raised together with the page size's and the token's, as one error.

    Raises:
        InvalidArgumentError: every fault at once: those in ``violations``, a bad page
            size, a token this service or this query did not issue.
    """
    v = violations if violations is not None else Violations()
    query_valid = not v  # a token cannot match a query that is itself invalid
    check_page_size(v, page_size, max_size)
    cursor = tokens.decode(page_token, key if query_valid else None, v)
    v.raise_if_any()
    limit = page_size or default_size
    rows = await fetch(cursor, limit + 1)  # one extra row tells whether a next page exists
    items = rows[:limit]
    if len(rows) <= limit:
        return items, ""
    return items, tokens.encode(Cursor(items[-1].created_at, items[-1].id), key)
