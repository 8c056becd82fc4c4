"""URI normalisation (RFC 3986 §6.2.2-6.2.3): one spelling of a URI before it is compared.

Every allow-list and classifier here looks at a normalised URI, never at the text a
caller sent, so ``HTTP://Host/a/../b`` and ``http://host/b`` are one URI:

* the scheme and the host are lower-cased;
* percent-encodings of unreserved characters are decoded, the others upper-cased, and
  characters outside ASCII are percent-encoded as UTF-8 (RFC 3987 §3.1);
* dot segments are removed (RFC 3986 §5.2.4);
* for http and https, the default port is dropped and an empty path becomes ``/``.

Some spellings are refused instead (``UriError``): whitespace, control characters and
backslashes; a malformed percent-encoding; and a dot or separator that is
percent-encoded where it could make a dot segment — any ``%2E`` in the authority or
path, and ``..%2F``, ``%2F..``, ``%5C``, or double encodings, that decode to a dot
segment. Servers and proxies disagree on whether they decode those before resolving dot
segments, so none is let through to be read one way here and another way there.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from urllib.parse import quote, unquote

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
# RFC 3986 appendix B: scheme, authority, path, query, fragment.
_PARTS = re.compile(r"(?:([^:/?#]+):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?", re.DOTALL)
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ENCODED_DOT = re.compile(r"%2e", re.IGNORECASE)
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_PORT = re.compile(r"[0-9]*")
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_DOTS = (".", "..")

UNSAFE_CHARACTERS = re.compile(r"[\s\x00-\x1f\x7f\\]")
"""Whitespace, control characters and backslashes: parsers disagree about them."""
UNSAFE = "must not contain whitespace, control characters or backslashes"
ENCODED_DOTS = "must not percent-encode dots or dot segments (%2E, ..%2F, %2F.., %5C)"


class UriError(ValueError):
    """A URI refused before it could be normalised; the message describes why."""


@dataclass(frozen=True, slots=True)
class Uri:
    """A normalised URI in its parts; ``str()`` gives its one spelling.

    Attributes:
        scheme: lower-case; empty for a relative reference.
        authority: ``[userinfo@]host[:port]`` with the host lower-cased, or None.
        path: percent-normalised, its dot segments removed.
        query: the text after ``?``, or None.
        fragment: the text after ``#``, or None.
        had_dot_segments: the path as given had ``.`` or ``..`` segments (now removed).
    """

    scheme: str
    authority: str | None
    path: str
    query: str | None
    fragment: str | None
    had_dot_segments: bool = False

    def __str__(self) -> str:
        """Recompose the URI (RFC 3986 §5.3)."""
        text = f"{self.scheme}:" if self.scheme else ""
        if self.authority is not None:
            text += f"//{self.authority}"
        text += self.path
        if self.query is not None:
            text += f"?{self.query}"
        if self.fragment is not None:
            text += f"#{self.fragment}"
        return text


def scheme_of(text: str) -> str:
    """The lower-cased scheme of ``text``, or "" when it has none (a relative reference)."""
    scheme, colon, _ = text.partition(":")
    return scheme.lower() if colon and _SCHEME.fullmatch(scheme) else ""


def normalize(text: str) -> Uri:
    """The normalised form of ``text`` (see the module docstring).

    Raises:
        UriError: an unsafe character, a malformed percent-encoding, an encoded dot or a
            separator encoded into a dot segment, or a port that is not a number.
    """
    if UNSAFE_CHARACTERS.search(text):
        raise UriError(UNSAFE)
    if _BAD_PERCENT.search(text):
        raise UriError("must percent-encode '%' as %25 (a '%' must be followed by two hex digits)")
    match = _PARTS.fullmatch(text)
    assert match is not None  # every string matches appendix B's expression
    raw_scheme, authority, path, query, fragment = match.groups()
    if raw_scheme is not None and not _SCHEME.fullmatch(raw_scheme):
        raise UriError("must start with a scheme of letters, digits, '+', '-' and '.'")
    scheme = (raw_scheme or "").lower()
    if _ENCODED_DOT.search(authority or "") or _encodes_dot_segment(path):
        raise UriError(ENCODED_DOTS)
    path = _percent(path)
    dotted = any(segment in _DOTS for segment in path.split("/"))
    if path.startswith("/"):
        path = remove_dot_segments(path)
    if authority is not None:
        authority = _authority(authority, scheme)
        if scheme in _DEFAULT_PORTS and not path:
            path = "/"
    return Uri(
        scheme=scheme,
        authority=authority,
        path=path,
        query=None if query is None else _percent(query),
        fragment=None if fragment is None else _percent(fragment),
        had_dot_segments=dotted,
    )


def is_under(uri: str, prefix: str) -> bool:
    """Whether normalised ``uri`` lies under normalised ``prefix``, on a segment boundary.

    ``https://a.example/loras/x`` is under ``https://a.example/loras`` (and ``.../loras/``);
    ``https://a.example/loras-evil/x`` is not.
    """
    if not uri.startswith(prefix):
        return False
    rest = uri[len(prefix) :]
    return prefix.endswith("/") or not rest or rest[0] in "/?#"


def remove_dot_segments(path: str) -> str:
    """``path`` without ``.`` and ``..`` segments (RFC 3986 §5.2.4)."""
    output: list[str] = []
    rest = path
    while rest:
        if rest.startswith(("../", "./")):
            rest = rest.partition("/")[2]
        elif rest.startswith("/./") or rest == "/.":
            rest = "/" + rest[3:]
        elif rest.startswith("/../") or rest == "/..":
            rest = "/" + rest[4:]
            if output:
                output.pop()
        elif rest in _DOTS:
            rest = ""
        else:
            end = rest.find("/", 1)
            end = len(rest) if end == -1 else end
            output.append(rest[:end])
            rest = rest[end:]
    return "".join(output)


def _percent(component: str) -> str:
    """Unreserved characters decoded, other percent-encodings upper-cased, non-ASCII encoded."""

    def one(found: re.Match[str]) -> str:
        character = chr(int(found.group(1), 16))
        return character if character in _UNRESERVED else f"%{found.group(1).upper()}"

    component = _NON_ASCII.sub(lambda found: quote(found.group(0), safe=""), component)
    return _PERCENT.sub(one, component)


def _encodes_dot_segment(path: str) -> bool:
    """Whether decoding ``path`` (once or more) makes a dot segment it does not spell."""
    if _ENCODED_DOT.search(path):
        return True
    decoded = path
    for _ in range(3):  # %25 hides an encoding one more level down
        once = unquote(decoded, errors="replace")
        if once == decoded:
            break
        decoded = once
    spelled = sum(segment in _DOTS for segment in path.split("/"))
    made = sum(segment in _DOTS for segment in re.split(r"[/\\]", decoded))
    return made > spelled


def _authority(authority: str, scheme: str) -> str:
    """``authority`` with its host lower-cased and a default or empty port dropped.

    Raises:
        UriError: the port is not a number.
    """
    userinfo, at, hostport = authority.rpartition("@")
    if hostport.startswith("["):  # an IPv6 literal: its colons are not the port's
        host, bracket, port_part = hostport.partition("]")
        host += bracket
    else:
        host, _, port_part = hostport.partition(":")
        port_part = ":" + port_part if ":" in hostport else ""
    port = port_part.removeprefix(":")
    if (port_part and not port_part.startswith(":")) or not _PORT.fullmatch(port):
        raise UriError("must have a port that is a number")
    if port == _DEFAULT_PORTS.get(scheme) or not port:
        port_part = ""
    return f"{_percent(userinfo)}{at}{_percent(host).lower()}{port_part}"
