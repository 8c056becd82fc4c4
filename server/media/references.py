"""Image references: the one place that parses and formats them.

An image reference is a string naming an image input (see the "Image references"
comment of ``sartiq/generation/v1/resources.proto``)::

    prediction:<prediction id>     the output of an earlier prediction
    artifact:<sha256>              an artifact of the caller's organization
    file:///absolute/path          a file under one of the server's input roots
    http://... or https://...      fetched by the server (``server.media.fetch``)

``parse_reference`` normalises the text first (``server.media.uris``: scheme and host
case, percent-encoding, dot segments; encoded dot segments refused), then classifies and
checks it against the server's policy (input roots, literal addresses), so no spelling
of a scheme or path is read one way here and another way later. Whether a
``prediction:`` or ``artifact:`` reference names anything, and whether a URL's host name
resolves to an allowed address, is decided later, by whoever looks it up or connects.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias
from urllib.parse import unquote

import httpx

from server.config import MediaSettings
from server.domain.errors import InvalidArgumentError, Violations
from server.media.uris import UNSAFE, UNSAFE_CHARACTERS, Uri, UriError, normalize, scheme_of

MAX_REFERENCE_CHARS = 2048
"""The longest reference accepted, in characters (Unicode code points)."""

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

_SHA256 = re.compile(r"[0-9a-f]{64}")
_HOST_NAME = re.compile(rb"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")  # IDNA-encoded, ASCII
_SCHEMES = frozenset({"prediction", "artifact", "file", "http", "https"})
_FETCHED_SCHEMES = frozenset({"file", "http", "https"})
_FORMS = "prediction:<id>, artifact:<sha256>, file:///absolute/path, http:// or https://"
_NON_PUBLIC = "a loopback, private, link-local, multicast, reserved or otherwise non-public address"


@dataclass(frozen=True, slots=True)
class PredictionRef:
    """``prediction:<id>``: the output artifact of an earlier prediction."""

    prediction_id: str


@dataclass(frozen=True, slots=True)
class ArtifactRef:
    """``artifact:<sha256>``: an artifact the caller's organization owns."""

    sha256: str


@dataclass(frozen=True, slots=True)
class FileRef:
    """``file:///absolute/path``: a file under one of the server's input roots.

    ``path`` is absolute and as written (percent-decoded), not resolved: symlinks are
    followed again, and containment checked again, when the file is read.
    """

    path: Path


@dataclass(frozen=True, slots=True)
class UrlRef:
    """``http(s)://...``: an image the server fetches; ``url`` is normalised.

    (Lower-case scheme and host, percent-encoding and dot segments normalised.)
    """

    url: str


Reference: TypeAlias = PredictionRef | ArtifactRef | FileRef | UrlRef
ExternalRef: TypeAlias = FileRef | UrlRef
"""The references whose bytes come from outside the service (see ``server.media.fetch``)."""


@dataclass(frozen=True, slots=True)
class ReferencePolicy:
    """What the server lets references reach.

    Attributes:
        input_roots: directories ``file://`` references may read from; none refuses them.
        allow_private_networks: let http(s) references reach non-public addresses
            (loopback, private, link-local, ...).
    """

    input_roots: tuple[Path, ...]
    allow_private_networks: bool

    @classmethod
    def from_settings(cls, media: MediaSettings) -> ReferencePolicy:
        """The policy the media settings configure."""
        return cls(
            input_roots=tuple(media.input_roots),
            allow_private_networks=media.allow_private_networks,
        )


def parse_reference(
    text: str, field: str, v: Violations, policy: ReferencePolicy
) -> Reference | None:
    """Parse an image reference, or record why it is refused.

    Args:
        text: the reference as the caller sent it.
        field: the request field path it came from, named in the violation.
        v: where a violation is recorded (INVALID_ARGUMENT).
        policy: the input roots and address policy to check against.

    Returns:
        The parsed reference, or None when a violation on ``field`` was recorded.
    """
    reference = _parse(text, policy)
    if isinstance(reference, str):
        v.add(field, reference)
        return None
    return reference


def parse_reference_or_raise(text: str, field: str, policy: ReferencePolicy) -> Reference:
    """Parse an image reference (see ``parse_reference``).

    Raises:
        InvalidArgumentError: the reference is malformed or refused; names ``field``.
    """
    reference = _parse(text, policy)
    if isinstance(reference, str):
        raise InvalidArgumentError.of(field, reference)
    return reference


def format_reference(ref: Reference) -> str:
    """The text of a reference; ``parse_reference`` reads it back as an equal reference.

    Raises:
        ValueError: a ``FileRef`` whose path is not absolute.
    """
    match ref:
        case PredictionRef(prediction_id):
            return f"prediction:{prediction_id}"
        case ArtifactRef(sha256):
            return f"artifact:{sha256}"
        case FileRef(path):
            return path.as_uri()  # percent-encoded, as parse_reference decodes it
        case UrlRef(url):
            return url
    raise AssertionError(f"unknown reference {ref!r}")  # pragma: no cover


def is_fetched(text: str) -> bool:
    """Whether ``text`` names an image the server fetches: ``file://`` or ``http(s)://``.

    Classified by the scheme alone, whatever its case (``HTTP://`` is ``http://``).
    """
    return scheme_of(text) in _FETCHED_SCHEMES


def url_violation(url: str, policy: ReferencePolicy) -> str | None:
    """Why ``url`` may not be fetched, or None when it may.

    Checks what the text alone tells: the scheme (http or https), a host, no
    credentials, a valid port, and that a literal IP address host (including the legacy
    forms ``127.1`` or ``2130706433`` that resolvers accept) is public unless the policy
    allows private networks. A host name is checked when it is resolved, on connecting.
    Used on references and again on every redirect.
    """
    # Parsers disagree about these (``http://a\\@b`` names host ``b`` for some, ``a`` for
    # others): a URL to fetch, a redirect's target included, has none.
    if UNSAFE_CHARACTERS.search(url):
        return UNSAFE
    scheme, _, rest = url.partition(":")
    if scheme.lower() not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not rest.startswith("//"):
        return "must be an http(s) URL with a host: http(s)://host/path"
    authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    if "@" in authority:
        return "must not contain credentials (user:password@)"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return "must be a valid http(s) URL"
    if not parsed.host:
        return "must be an http(s) URL with a host: http(s)://host/path"
    if parsed.port is not None and not 0 < parsed.port < 65536:
        return "must have a port from 1 to 65535"
    address = literal_address(parsed.host)
    if address is None and not _HOST_NAME.fullmatch(parsed.raw_host):
        return "must have a valid host name"
    if address is not None and not policy.allow_private_networks and not is_public(address):
        return f"must not target {_NON_PUBLIC}"
    return None


def literal_address(host: str) -> IPAddress | None:
    """The IP address ``host`` spells, or None when it is a host name to resolve.

    Besides the standard forms this reads the legacy IPv4 ones the C resolver accepts
    (``127.1``, ``0x7f.0.0.1``, ``2130706433``), so they cannot pass for host names.
    """
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        pass
    if not re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def is_public(address: IPAddress) -> bool:
    """Whether ``address`` is a public unicast address a fetch may connect to.

    Loopback, private, link-local, multicast, reserved, unspecified and other
    non-global addresses are not; an IPv4 address embedded in IPv6 (IPv4-mapped or
    6to4) is judged as that IPv4 address.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None and not is_public(embedded):
            return False
    return address.is_global and not (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


def locate_under_roots(path: Path, roots: tuple[Path, ...]) -> tuple[Path, Path] | None:
    """The real path of ``path`` and the real root holding it, or None outside every root.

    Symlinks are followed (on ``path`` and on the roots); a path that does not exist is
    resolved as far as it does.
    """
    try:
        real = Path(os.path.realpath(path, strict=False))
    except (OSError, ValueError):
        return None
    for root in roots:
        try:
            real_root = Path(os.path.realpath(root, strict=False))
        except (OSError, ValueError):
            continue
        if real.is_relative_to(real_root):
            return real_root, real
    return None


def _parse(text: str, policy: ReferencePolicy) -> Reference | str:
    """The reference ``text`` names, or the description of what is wrong with it."""
    if not text:
        return f"must not be empty: an image reference is one of {_FORMS}"
    if len(text) > MAX_REFERENCE_CHARS:
        return f"must be at most {MAX_REFERENCE_CHARS} characters (it has {len(text)})"
    if scheme_of(text) not in _SCHEMES:
        return f"must start with one of {_FORMS}"
    try:
        uri = normalize(text)  # one spelling, before anything is classified or checked
    except UriError as exc:
        return str(exc)
    rest = str(uri).partition(":")[2]
    match uri.scheme:
        case "prediction":
            return _parse_prediction(rest)
        case "artifact":
            if not _SHA256.fullmatch(rest):
                return "must be artifact:<sha256> with 64 lowercase hexadecimal digits"
            return ArtifactRef(rest)
        case "file":
            return _parse_file(uri, policy)
    url = str(uri)
    problem = url_violation(url, policy)
    return UrlRef(url) if problem is None else problem


def _parse_prediction(rest: str) -> PredictionRef | str:
    try:
        canonical = str(uuid.UUID(rest))
    except ValueError:
        canonical = None
    if canonical != rest:
        return "must be prediction:<prediction id>, the id a UUID in lowercase canonical form"
    return PredictionRef(rest)


def _parse_file(uri: Uri, policy: ReferencePolicy) -> FileRef | str:
    if not policy.input_roots:
        return "must not be a file:// reference: the server has no input roots configured"
    if uri.authority is None:
        return "must be file:///absolute/path"
    if uri.authority:
        return "must not name a host: a file reference is file:///absolute/path"
    if uri.query is not None or uri.fragment is not None:
        return "must not have a query or fragment (percent-encode '?' and '#' in file names)"
    if uri.had_dot_segments:
        return "must not contain '.' or '..' segments"  # read as written, never rewritten
    try:
        decoded = unquote(uri.path, errors="strict")
    except UnicodeDecodeError:
        return "must percent-encode its path as UTF-8"
    if "\x00" in decoded:
        return "must not contain NUL characters"
    if not decoded.startswith("/"):
        return "must be file:///absolute/path"
    path = Path(decoded)
    if locate_under_roots(path, policy.input_roots) is None:
        return "must be a file under one of the server's input roots"
    return FileRef(path)
