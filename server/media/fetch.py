"""Fetching the bytes of external image references (``file://`` and ``http(s)://``).

``InputFetcher`` is the seam; ``Fetcher`` is the real one and ``FakeFetcher`` stands in
for it in tests of other layers.

What ``Fetcher`` guarantees:

* Files are read only from under an input root. Containment is checked again at fetch
  time on the real path, and the file is then opened one path component at a time,
  beneath the root and without following symlinks, so a symlink swapped in after the
  check cannot lead out. Only regular files, of at most ``max_bytes``.
* URLs are fetched with redirects followed by hand, each hop checked like a reference;
  one time limit covers the whole fetch; at most ``max_bytes`` are read, whatever the
  server claims; no proxy, cookie or credential is taken from the environment or kept
  between fetches.
* Addresses are checked on the connection itself (``PinnedNetworkBackend``): the host is
  resolved once per connection, every answer is checked, and the connection is made to
  the checked address, so DNS rebinding cannot slip a private address in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import Literal, Protocol, Self, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import httpcore
import httpx

from server.config import MediaSettings
from server.domain.errors import excerpt
from server.media.references import (
    ExternalRef,
    FileRef,
    IPAddress,
    ReferencePolicy,
    UrlRef,
    format_reference,
    is_public,
    literal_address,
    locate_under_roots,
    url_violation,
)

FetchReason: TypeAlias = Literal[
    "not_found",
    "forbidden",
    "too_large",
    "timeout",
    "bad_status",
    "unreachable",
    "too_many_redirects",
]

Resolver: TypeAlias = Callable[[str, int], Awaitable[list[str]]]
"""Resolves ``(host, port)`` to IP address strings, in the order to try them."""

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SHOWN_URL_CHARS = 200


class FetchError(Exception):
    """An external image could not be fetched.

    Attributes:
        reason: why, in one stable word (``FetchReason``): "not_found", "forbidden",
            "too_large", "timeout", "bad_status", "unreachable" or "too_many_redirects".
        message: what happened, for logs and the failed prediction; it never shows a
            URL's query string (signed URLs carry secrets there).
    """

    def __init__(self, reason: FetchReason, message: str) -> None:
        super().__init__(message)
        self.reason: FetchReason = reason
        self.message = message


class InputFetcher(Protocol):
    """Fetches the bytes of external image references."""

    async def fetch(self, ref: ExternalRef) -> bytes:
        """The bytes ``ref`` names.

        Raises:
            FetchError: they cannot be fetched; ``reason`` says why.
        """


async def system_resolve(host: str, port: int) -> list[str]:
    """The addresses the system resolver gives for ``host``, in its order."""
    loop = asyncio.get_running_loop()
    answers = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(answer[4][0]) for answer in answers]


class PinnedNetworkBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to addresses it has checked itself.

    ``connect_tcp`` resolves the host once with ``resolve``, refuses the connection when
    any answer is not public (unless private networks are allowed), then has ``inner``
    connect to a checked IP address. ``inner`` never sees the host name, so it cannot
    resolve it again: a second, different DNS answer is never used (DNS rebinding).

    TLS is unaffected: httpcore (``AsyncHTTPConnection._connect``) calls ``start_tls``
    on the stream returned here with ``server_hostname`` taken from the request's URL
    (or its ``sni_hostname`` extension), never from the address connected to, so SNI and
    certificate verification still use the host name.
    """

    def __init__(
        self,
        *,
        allow_private_networks: bool,
        resolve: Resolver = system_resolve,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._allow_private_networks = allow_private_networks
        self._resolve = resolve
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def addresses(self, host: str, port: int) -> list[IPAddress]:
        """The checked addresses of ``host``, resolved once, in the order to try them.

        Raises:
            FetchError: (forbidden) one of them is not public and private networks are
                not allowed.
            httpcore.ConnectError: the host does not resolve.
        """
        literal = literal_address(host)
        if literal is not None:
            answers = [literal]
        else:
            try:
                texts = await self._resolve(host, port)
                answers = [ipaddress.ip_address(text) for text in texts]
            except (OSError, ValueError) as exc:
                raise httpcore.ConnectError(f"cannot resolve {excerpt(host)}") from exc
        answers = list(dict.fromkeys(answers))
        if not answers:
            raise httpcore.ConnectError(f"{excerpt(host)} resolves to no address")
        if not self._allow_private_networks:
            for address in answers:
                if not is_public(address):
                    raise FetchError(
                        "forbidden",
                        # The address stays out of the message: it would let callers map
                        # internal DNS names.
                        f"{excerpt(host)} resolves to a non-public address, and this server "
                        "does not fetch from private networks",
                    )
        return answers

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to a checked address of ``host`` (see the class docstring)."""
        failure: httpcore.ConnectError | None = None
        for address in await self.addresses(host, port):
            try:
                return await self._inner.connect_tcp(
                    str(address),
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None  # addresses() returns at least one address
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Refused: image fetches never use Unix sockets."""
        raise httpcore.ConnectError("image fetches never use Unix sockets")

    async def sleep(self, seconds: float) -> None:
        """Sleep, as the inner backend does (httpcore uses it between retries)."""
        await self._inner.sleep(seconds)


# httpcore's errors and the httpx errors they become, most specific first.
_HTTPX_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


@contextlib.contextmanager
def _httpx_errors() -> Iterator[None]:
    """Re-raise httpcore's errors as the httpx errors callers of a transport expect."""
    try:
        yield
    except Exception as exc:
        for core, mapped in _HTTPX_ERRORS:
            if isinstance(exc, core):
                raise mapped(str(exc)) from exc
        raise


class _ResponseStream(httpx.AsyncByteStream):
    """The body of an httpcore response, as httpx reads it."""

    def __init__(self, response: httpcore.Response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors():
            async for chunk in self._response.aiter_stream():
                yield chunk

    async def aclose(self) -> None:
        with _httpx_errors():
            await self._response.aclose()


class _PinnedTransport(httpx.AsyncBaseTransport):
    """An httpx transport over an httpcore pool that connects through a given backend.

    httpx 0.28 offers no public way to hand ``httpx.AsyncHTTPTransport`` a network
    backend: it builds its ``httpcore.AsyncConnectionPool`` itself and keeps it in the
    private ``_pool``. Both halves needed are public, though: custom transports
    (``httpx.AsyncBaseTransport``) and ``httpcore.AsyncConnectionPool(network_backend=)``.
    This is the small adapter between them (what ``AsyncHTTPTransport`` does for the
    no-proxy, HTTP/1.1 case), rather than a patch of ``transport._pool._network_backend``
    that any httpx release may break. Having no proxy configuration at all, it never
    routes through one, whatever the environment says.
    """

    def __init__(self, backend: httpcore.AsyncNetworkBackend) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            http1=True,
            http2=False,
            retries=0,
            network_backend=backend,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the pool (the ``httpx.AsyncBaseTransport`` contract)."""
        if not isinstance(request.stream, httpx.AsyncByteStream):
            raise TypeError("an async transport needs an async request body")
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors():
            response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._pool.aclose()


def _no_cookies() -> CookieJar:
    """A cookie jar that keeps nothing: one client serves the fetches of every caller.

    (Given to httpx as a ``CookieJar``: wrapped in ``httpx.Cookies`` it would be copied
    into a jar with the default, accepting, policy.)
    """
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def _shown(url: str) -> str:
    """``url`` fit for a message: without credentials, query or fragment, and short."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "an invalid URL"
    host = parts.netloc.rpartition("@")[2]
    return excerpt(urlunsplit((parts.scheme, host, parts.path, "", "")), _SHOWN_URL_CHARS)


class Fetcher:
    """Fetches external image references within a policy and limits.

    It owns an ``httpx.AsyncClient``: close it with ``aclose()``, or use the fetcher as
    an async context manager.
    """

    def __init__(
        self,
        policy: ReferencePolicy,
        *,
        max_bytes: int,
        timeout: float,
        max_redirects: int,
        resolve: Resolver | None = None,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        """Create a fetcher.

        Args:
            policy: the input roots and whether private networks may be reached.
            max_bytes: the largest image, in bytes.
            timeout: seconds one http(s) fetch may take in all, redirects included.
            max_redirects: how many redirects one fetch follows at most.
            resolve: resolves host names (default: the event loop's ``getaddrinfo``).
            network_backend: opens TCP connections to addresses already checked
                (default: httpcore's ``AnyIOBackend``); tests use it to play the network.
        """
        self._policy = policy
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._max_redirects = max_redirects
        backend = PinnedNetworkBackend(
            allow_private_networks=policy.allow_private_networks,
            resolve=resolve if resolve is not None else system_resolve,
            inner=network_backend,
        )
        self._client = httpx.AsyncClient(
            transport=_PinnedTransport(backend),
            follow_redirects=False,  # _fetch_url follows them, checking every hop
            # No proxy or certificate settings from the environment. (With a transport of
            # its own httpx mounts no environment proxy anyway; this says it outright.)
            trust_env=False,
            timeout=httpx.Timeout(timeout),  # per operation; _fetch_url bounds the total
            cookies=_no_cookies(),
            # Image formats are compressed already; a compressed body could inflate far
            # beyond max_bytes in one chunk, so only identity bodies are accepted.
            headers={"Accept-Encoding": "identity", "User-Agent": "sartiq-generation"},
        )

    @classmethod
    def from_settings(cls, media: MediaSettings, *, resolve: Resolver | None = None) -> Fetcher:
        """A fetcher with the policy and limits the media settings configure."""
        return cls(
            ReferencePolicy.from_settings(media),
            max_bytes=media.max_input_bytes,
            timeout=media.fetch_timeout,
            max_redirects=media.max_redirects,
            resolve=resolve,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP client and its connections."""
        await self._client.aclose()

    async def fetch(self, ref: ExternalRef) -> bytes:
        """The bytes ``ref`` names.

        Raises:
            FetchError: they cannot be fetched within the policy and limits.
        """
        match ref:
            case FileRef(path):
                return await asyncio.to_thread(self._read_file, path)
            case UrlRef(url):
                return await self._fetch_url(url)
        raise AssertionError(f"not an external reference: {ref!r}")  # pragma: no cover

    def _read_file(self, path: Path) -> bytes:
        """Read ``path`` from under an input root (blocking; run in a thread)."""
        located = locate_under_roots(path, self._policy.input_roots)
        if located is None:
            raise FetchError("forbidden", f"{path} is not under one of the server's input roots")
        root, real = located
        try:
            fd = _open_beneath(root, real.relative_to(root).parts)
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise FetchError("forbidden", f"{path} is not a regular file")
                if info.st_size > self._max_bytes:
                    raise FetchError(
                        "too_large", f"{path} is {info.st_size} bytes, over {self._max_bytes}"
                    )
                data = _read_at_most(fd, self._max_bytes + 1)  # it may have grown since
            finally:
                os.close(fd)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise FetchError("not_found", f"{path} does not exist") from exc
        except PermissionError as exc:
            raise FetchError("forbidden", f"{path} cannot be read by the server") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FetchError(
                    "forbidden", f"{path} changed into a symlink while being opened"
                ) from exc
            raise FetchError("unreachable", f"{path} cannot be read: {exc.strerror}") from exc
        if len(data) > self._max_bytes:
            raise FetchError("too_large", f"{path} has more than {self._max_bytes} bytes")
        return data

    async def _fetch_url(self, url: str) -> bytes:
        """Fetch ``url``, following redirects, within the total time limit."""
        try:
            async with asyncio.timeout(self._timeout):
                return await self._follow(url)
        except TimeoutError as exc:
            raise FetchError(
                "timeout", f"fetching {_shown(url)} took more than {self._timeout:g} s"
            ) from exc

    async def _follow(self, url: str) -> bytes:
        """Fetch ``url``, checking it and every redirect target before connecting."""
        target = url
        for redirects in range(self._max_redirects + 1):
            problem = url_violation(target, self._policy)
            if problem is not None:
                hop = "the URL" if not redirects else f"redirect {redirects}"
                raise FetchError("forbidden", f"{_shown(target)} is refused: {hop} {problem}")
            outcome = await self._get(target)
            if isinstance(outcome, bytes):
                return outcome
            target = outcome
        raise FetchError(
            "too_many_redirects",
            f"{_shown(url)} redirected more than {self._max_redirects} times",
        )

    async def _get(self, url: str) -> bytes | str:
        """The body at ``url``, or the URL it redirects to."""
        shown = _shown(url)
        try:
            async with self._client.stream("GET", url) as response:
                status = response.status_code
                if status in _REDIRECT_STATUSES:
                    return _redirect_target(response, shown)
                if not response.is_success:
                    raise FetchError(
                        "bad_status", f"{shown} answered {status} {response.reason_phrase}"
                    )
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    raise FetchError(
                        "bad_status", f"{shown} sent a {excerpt(encoding)}-encoded body"
                    )
                declared = _content_length(response)
                if declared is not None and declared > self._max_bytes:
                    raise FetchError(
                        "too_large", f"{shown} is {declared} bytes, over {self._max_bytes}"
                    )
                return await self._read_body(response, shown)
        except httpx.TimeoutException as exc:
            raise FetchError("timeout", f"{shown} did not answer in time") from exc
        except httpx.ProtocolError as exc:
            raise FetchError("bad_status", f"{shown} sent an invalid HTTP response") from exc
        except httpx.TransportError as exc:
            raise FetchError("unreachable", f"{shown} cannot be reached: {exc}") from exc

    async def _read_body(self, response: httpx.Response, shown: str) -> bytes:
        """The body, refused as soon as it passes ``max_bytes``."""
        body = bytearray()
        async for chunk in response.aiter_raw():
            if len(body) + len(chunk) > self._max_bytes:
                raise FetchError("too_large", f"{shown} sent more than {self._max_bytes} bytes")
            body += chunk
        return bytes(body)


def _content_length(response: httpx.Response) -> int | None:
    """The declared body size, if any (h11 refuses malformed and conflicting ones)."""
    try:
        return int(response.headers["content-length"])
    except (KeyError, ValueError):
        return None  # the body is still counted while it is read


def _redirect_target(response: httpx.Response, shown: str) -> str:
    """Where a redirect response points, resolved against its URL."""
    location = response.headers.get("location")
    if not location:
        raise FetchError("bad_status", f"{shown} redirected without a Location")
    try:
        return str(response.url.join(location))
    except httpx.InvalidURL as exc:
        raise FetchError("bad_status", f"{shown} redirected to an invalid URL") from exc


def _open_beneath(root: Path, parts: tuple[str, ...]) -> int:
    """A read-only descriptor of ``root/parts...``, no symlink below ``root`` followed.

    Each component is opened relative to its parent's descriptor with ``O_NOFOLLOW``, so
    a component that became a symlink since the path was resolved fails with ``ELOOP``
    instead of leading out of ``root``. ``O_NONBLOCK`` keeps a FIFO from blocking the
    open (it is refused afterwards as not a regular file).

    Raises:
        OSError: a component is missing, not a directory, a symlink, or unreadable.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for part in parts:
        parent = fd
        try:
            fd = os.open(part, flags, dir_fd=parent)
        finally:
            os.close(parent)
    return fd


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes from ``fd``, stopping there or at the end of the file."""
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class FakeFetcher:
    """An ``InputFetcher`` serving fixed outcomes, for tests of other layers.

    Attributes:
        calls: the formatted reference of every fetch, in order, recorded on entry.
        gate: when set, every fetch waits for it first (to simulate a slow fetch).
    """

    def __init__(
        self,
        outcomes: Mapping[str, bytes | Exception],
        *,
        gate: asyncio.Event | None = None,
    ) -> None:
        """Serve ``outcomes``: formatted reference -> bytes to return or error to raise.

        A reference missing from ``outcomes`` raises ``FetchError("not_found")``.
        """
        self._outcomes = dict(outcomes)
        self.calls: list[str] = []
        self.gate = gate

    async def fetch(self, ref: ExternalRef) -> bytes:
        """The outcome registered for ``ref``.

        Raises:
            Exception: the one registered for ``ref``; ``FetchError`` when none is.
        """
        key = format_reference(ref)
        self.calls.append(key)
        if self.gate is not None:
            await self.gate.wait()
        outcome = self._outcomes.get(key)
        if outcome is None:
            raise FetchError("not_found", f"{key} is not served by this fake")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
