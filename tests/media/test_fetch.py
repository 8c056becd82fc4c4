"""The fetch seam: files under the roots, http(s) within limits, and only checked addresses.

HTTP runs against a minimal HTTP/1.1 server on 127.0.0.1 in the test's own event loop.
Public hosts are played by test network backends: the fetcher resolves and checks an
address, then asks its backend to connect to it; ``PlayedInternet`` records the address
and connects to the local server instead, so no test ever leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpcore
import pytest

from server.config import MediaSettings
from server.domain.errors import Violations
from server.media import fetch as fetch_module
from server.media.fetch import FakeFetcher, Fetcher, FetchError, InputFetcher
from server.media.references import (
    FileRef,
    ReferencePolicy,
    UrlRef,
    locate_under_roots,
    parse_reference,
)

PUBLIC_IP = "93.184.216.34"  # a global address; only ever "reached" through PlayedInternet

# --- a minimal HTTP/1.1 server -----------------------------------------------------------

Handler = Callable[[asyncio.StreamWriter, "LocalServer"], Awaitable[None]]


@dataclass
class Seen:
    target: str
    headers: dict[str, str]


@dataclass
class LocalServer:
    """Answers each request by its target from ``routes``; one request per connection."""

    routes: dict[str, Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    def url(self, target: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{target}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            target = request_line.split(" ")[1]
            headers = {}
            for line in filter(None, lines):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self.seen.append(Seen(target, headers))
            await self.routes.get(target, reply(404, b"no such image"))(writer, self)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up, as it does on refusing a body
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def stop(self) -> None:
        self.release.set()
        await asyncio.gather(*self._handlers)


def head(status: int, *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} Status{status}", "Connection: close", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def reply(status: int, body: bytes = b"", *headers: str) -> Handler:
    async def handler(writer: asyncio.StreamWriter, server: LocalServer) -> None:
        writer.write(head(status, f"Content-Length: {len(body)}", *headers) + body)
        await writer.drain()

    return handler


def redirect(location: str, status: int = 302) -> Handler:
    return reply(status, b"", f"Location: {location}")


def headers_then_stall(*headers: str) -> Handler:
    async def handler(writer: asyncio.StreamWriter, server: LocalServer) -> None:
        writer.write(head(200, *headers))
        await writer.drain()
        await server.release.wait()

    return handler


async def stall(writer: asyncio.StreamWriter, server: LocalServer) -> None:
    await server.release.wait()


async def endless_chunks(writer: asyncio.StreamWriter, server: LocalServer) -> None:
    writer.write(head(200, "Transfer-Encoding: chunked"))
    chunk = b"400\r\n" + b"x" * 0x400 + b"\r\n"
    while not (server.release.is_set() or writer.is_closing()):
        writer.write(chunk)
        await writer.drain()  # raises once the client hangs up


async def drip(writer: asyncio.StreamWriter, server: LocalServer) -> None:
    # Each byte arrives well within the per-read timeout; only a total limit ends this.
    writer.write(head(200, "Content-Length: 500"))
    while not (server.release.is_set() or writer.is_closing()):
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.05)


@pytest.fixture
async def server() -> AsyncIterator[LocalServer]:
    local = LocalServer()
    listener = await asyncio.start_server(local.serve, "127.0.0.1", 0)
    local.port = listener.sockets[0].getsockname()[1]
    try:
        yield local
    finally:
        listener.close()
        await listener.wait_closed()
        await local.stop()


# --- played DNS and network --------------------------------------------------------------


class FakeDns:
    """Answers the n-th lookup with the n-th answer (the last one ever after)."""

    def __init__(self, *answers: list[str]) -> None:
        self._answers = answers
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        return self._answers[min(len(self.asked), len(self._answers)) - 1]


class PlayedInternet(httpcore.AsyncNetworkBackend):
    """Records the address each connection is made to, and connects to the local server."""

    def __init__(self, port: int) -> None:
        self.dialed: list[tuple[str, int]] = []
        self._port = port
        self._real = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.dialed.append((host, port))
        return await self._real.connect_tcp("127.0.0.1", self._port, timeout=timeout)


class HandshakeProbe(httpcore.AsyncNetworkStream):
    """A connection that records the TLS server name asked for, then fails the handshake."""

    def __init__(self, names: list[str | None]) -> None:
        self._names = names

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self._names.append(server_hostname)
        raise httpcore.ConnectError("the test stops at the handshake")

    async def aclose(self) -> None:
        pass


class TlsRecorder(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.dialed: list[tuple[str, int]] = []
        self.server_names: list[str | None] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.dialed.append((host, port))
        return HandshakeProbe(self.server_names)


def make_fetcher(
    *roots: Path,
    allow_private_networks: bool = True,
    max_bytes: int = 1000,
    timeout: float = 5.0,
    max_redirects: int = 3,
    resolve: FakeDns | None = None,
    network_backend: httpcore.AsyncNetworkBackend | None = None,
) -> Fetcher:
    return Fetcher(
        ReferencePolicy(roots, allow_private_networks),
        max_bytes=max_bytes,
        timeout=timeout,
        max_redirects=max_redirects,
        resolve=resolve,
        network_backend=network_backend,
    )


async def fetch_error(fetcher: Fetcher, ref: FileRef | UrlRef) -> FetchError:
    with pytest.raises(FetchError) as raised:
        await fetcher.fetch(ref)
    return raised.value


# --- files -------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    inputs = tmp_path / "inputs"
    (inputs / "looks").mkdir(parents=True)
    (inputs / "looks" / "a.png").write_bytes(b"a" * 1000)
    return inputs


async def test_a_file_under_a_root_is_read(root: Path) -> None:
    (root / "cover.png").symlink_to(root / "looks" / "a.png")  # a symlink inside: fine
    async with make_fetcher(root) as fetcher:
        assert await fetcher.fetch(FileRef(root / "looks" / "a.png")) == b"a" * 1000
        assert await fetcher.fetch(FileRef(root / "cover.png")) == b"a" * 1000


async def test_a_file_over_the_limit_is_too_large(root: Path) -> None:
    (root / "big.png").write_bytes(b"b" * 1001)
    async with make_fetcher(root, max_bytes=1000) as fetcher:
        error = await fetch_error(fetcher, FileRef(root / "big.png"))

    assert error.reason == "too_large"
    assert str(error) == f"{root / 'big.png'} is 1001 bytes, over 1000"  # known from stat


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
async def test_a_file_larger_than_its_stat_says_is_cut_at_the_limit() -> None:
    # /proc files report size 0 and hold more: only the bounded read can catch them.
    proc = Path("/proc/self")
    async with make_fetcher(proc, max_bytes=100) as fetcher:
        error = await fetch_error(fetcher, FileRef(proc / "maps"))

    assert error.reason == "too_large"
    assert str(error) == "/proc/self/maps has more than 100 bytes"


async def test_a_missing_file_is_not_found(root: Path) -> None:
    async with make_fetcher(root) as fetcher:
        missing = await fetch_error(fetcher, FileRef(root / "looks" / "gone.png"))
        under_a_file = await fetch_error(fetcher, FileRef(root / "looks" / "a.png" / "x.png"))

    assert missing.reason == under_a_file.reason == "not_found"


async def test_only_regular_files_are_read(root: Path) -> None:
    os.mkfifo(root / "pipe.png")  # would block a plain open() forever
    async with make_fetcher(root) as fetcher:
        directory = await fetch_error(fetcher, FileRef(root / "looks"))
        the_root = await fetch_error(fetcher, FileRef(root))
        fifo = await fetch_error(fetcher, FileRef(root / "pipe.png"))

    assert directory.reason == the_root.reason == fifo.reason == "forbidden"
    assert str(directory) == f"{root / 'looks'} is not a regular file"


async def test_a_file_outside_the_roots_is_forbidden(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"secret")
    async with make_fetcher(root) as fetcher:
        error = await fetch_error(fetcher, FileRef(outside))
    async with make_fetcher() as fetcher:  # no roots at all
        no_roots = await fetch_error(fetcher, FileRef(root / "looks" / "a.png"))

    assert error.reason == no_roots.reason == "forbidden"


async def test_a_file_swapped_for_a_symlink_after_parsing_is_forbidden(
    root: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret")
    v = Violations()
    ref = parse_reference(f"file://{root}/looks/a.png", "f", v, ReferencePolicy((root,), False))
    assert isinstance(ref, FileRef)

    (root / "looks" / "a.png").unlink()
    (root / "looks" / "a.png").symlink_to(secret)
    async with make_fetcher(root) as fetcher:
        error = await fetch_error(fetcher, ref)

    assert error.reason == "forbidden"


async def test_a_directory_swapped_for_a_symlink_after_the_check_is_not_followed(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race between checking the real path and opening it: the check has seen the real
    # directory, then "looks" becomes a symlink out of the root before the open.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.png").write_bytes(b"secret")
    checked = locate_under_roots(root / "looks" / "a.png", (root,))
    monkeypatch.setattr(fetch_module, "locate_under_roots", lambda path, roots: checked)
    (root / "looks" / "a.png").unlink()
    (root / "looks").rmdir()
    (root / "looks").symlink_to(elsewhere)

    async with make_fetcher(root) as fetcher:
        error = await fetch_error(fetcher, FileRef(root / "looks" / "a.png"))

    assert error.reason == "forbidden"
    assert str(error) == f"{root / 'looks' / 'a.png'} changed into a symlink while being opened"


# --- http(s) -----------------------------------------------------------------------------


async def test_an_image_is_fetched_over_http(server: LocalServer) -> None:
    server.routes["/a.png"] = reply(200, b"png bytes", "Set-Cookie: session=abc; Path=/")
    async with make_fetcher() as fetcher:
        assert await fetcher.fetch(UrlRef(server.url("/a.png"))) == b"png bytes"
        assert await fetcher.fetch(UrlRef(server.url("/a.png"))) == b"png bytes"

    first, second = server.seen
    assert first.headers["host"] == f"127.0.0.1:{server.port}"
    assert first.headers["accept-encoding"] == "identity"
    assert "authorization" not in first.headers
    assert "cookie" not in second.headers  # nothing is kept between fetches


async def test_a_non_success_status_is_bad_status(server: LocalServer) -> None:
    server.routes["/broken.png"] = reply(500, b"oops")
    async with make_fetcher() as fetcher:
        missing = await fetch_error(fetcher, UrlRef(server.url("/missing.png")))
        broken = await fetch_error(fetcher, UrlRef(server.url("/broken.png")))

    assert missing.reason == broken.reason == "bad_status"
    assert str(missing) == f"{server.url('/missing.png')} answered 404 Status404"


async def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    server: LocalServer,
) -> None:
    # The body never comes: reading it would hang until the timeout.
    server.routes["/huge.png"] = headers_then_stall("Content-Length: 1000000000")
    async with make_fetcher(max_bytes=1000, timeout=5.0) as fetcher:
        error = await fetch_error(fetcher, UrlRef(server.url("/huge.png")))

    assert error.reason == "too_large"
    assert str(error) == f"{server.url('/huge.png')} is 1000000000 bytes, over 1000"


async def test_an_endless_body_is_cut_at_the_limit(server: LocalServer) -> None:
    # Chunked, no declared length, never ending: only counting while reading stops it.
    server.routes["/endless.png"] = endless_chunks
    async with make_fetcher(max_bytes=3000, timeout=5.0) as fetcher:
        error = await fetch_error(fetcher, UrlRef(server.url("/endless.png")))

    assert error.reason == "too_large"
    assert str(error) == f"{server.url('/endless.png')} sent more than 3000 bytes"


async def test_a_body_exactly_at_the_limit_is_accepted(server: LocalServer) -> None:
    server.routes["/exact.png"] = reply(200, b"e" * 1000)
    async with make_fetcher(max_bytes=1000) as fetcher:
        assert await fetcher.fetch(UrlRef(server.url("/exact.png"))) == b"e" * 1000


async def test_a_compressed_body_is_refused(server: LocalServer) -> None:
    server.routes["/a.png"] = reply(200, b"\x1f\x8b", "Content-Encoding: gzip")
    async with make_fetcher() as fetcher:
        error = await fetch_error(fetcher, UrlRef(server.url("/a.png")))

    assert error.reason == "bad_status"


async def test_redirects_within_the_limit_are_followed(server: LocalServer) -> None:
    server.routes["/r3"] = redirect(server.url("/r2"), 301)
    server.routes["/r2"] = redirect("/r1", 307)  # relative
    server.routes["/r1"] = redirect(f"//127.0.0.1:{server.port}/final.png", 308)
    server.routes["/final.png"] = reply(200, b"final")
    async with make_fetcher(max_redirects=3) as fetcher:
        assert await fetcher.fetch(UrlRef(server.url("/r3"))) == b"final"

    assert [seen.target for seen in server.seen] == ["/r3", "/r2", "/r1", "/final.png"]


async def test_one_redirect_too_many_is_refused(server: LocalServer) -> None:
    for hop in range(4):
        server.routes[f"/r{hop + 1}"] = redirect(f"/r{hop}")
    server.routes["/r0"] = reply(200, b"final")
    async with make_fetcher(max_redirects=3) as fetcher:
        error = await fetch_error(fetcher, UrlRef(server.url("/r4")))

    assert error.reason == "too_many_redirects"
    assert str(error) == f"{server.url('/r4')} redirected more than 3 times"
    assert [seen.target for seen in server.seen] == ["/r4", "/r3", "/r2", "/r1"]


async def test_no_redirects_allowed_means_none_followed(server: LocalServer) -> None:
    server.routes["/r1"] = redirect("/final.png")
    async with make_fetcher(max_redirects=0) as fetcher:
        error = await fetch_error(fetcher, UrlRef(server.url("/r1")))

    assert error.reason == "too_many_redirects"


async def test_a_redirect_to_another_scheme_is_forbidden(server: LocalServer, root: Path) -> None:
    server.routes["/to-file"] = redirect(f"file://{root}/looks/a.png")
    server.routes["/to-ftp"] = redirect("ftp://images.example.com/a.png")
    server.routes["/with-credentials"] = redirect(f"http://u:p@127.0.0.1:{server.port}/a")
    async with make_fetcher(root) as fetcher:
        errors = [
            await fetch_error(fetcher, UrlRef(server.url(target)))
            for target in ("/to-file", "/to-ftp", "/with-credentials")
        ]

    assert [error.reason for error in errors] == ["forbidden"] * 3
    assert str(errors[0]) == (
        f"file://{root}/looks/a.png is refused: redirect 1 must be an http:// or https:// URL"
    )
    assert len(server.seen) == 3  # no hop was requested after a refused one


async def test_a_stalled_server_times_out_within_the_limit(server: LocalServer) -> None:
    server.routes["/slow.png"] = stall
    async with make_fetcher(timeout=0.5) as fetcher:
        started = time.monotonic()
        error = await fetch_error(fetcher, UrlRef(server.url("/slow.png")))

    assert error.reason == "timeout"
    # Not a speed check: the stalled answer never ends, so only the limit stops the fetch;
    # the bound is loose enough for a loaded machine and far below the test's own timeout.
    assert 0.4 < time.monotonic() - started < 10.0
    assert str(error) == f"fetching {server.url('/slow.png')} took more than 0.5 s"


async def test_the_time_limit_covers_the_whole_fetch(server: LocalServer) -> None:
    # A byte every 50 ms never trips a per-read timeout; the total limit still holds.
    server.routes["/drip.png"] = drip
    async with make_fetcher(timeout=0.5) as fetcher:
        started = time.monotonic()
        error = await fetch_error(fetcher, UrlRef(server.url("/drip.png")))

    assert error.reason == "timeout"
    # The drip would complete its 500 bytes after 25 s; the limit ends it long before.
    assert time.monotonic() - started < 10.0


async def test_a_closed_port_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens once it is closed
    async with make_fetcher() as fetcher:
        error = await fetch_error(fetcher, UrlRef(f"http://127.0.0.1:{port}/a.png"))

    assert error.reason == "unreachable"


async def test_an_unresolvable_host_is_unreachable() -> None:
    async def no_such_host(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async with Fetcher(
        ReferencePolicy((), True), max_bytes=10, timeout=5, max_redirects=0, resolve=no_such_host
    ) as fetcher:
        error = await fetch_error(fetcher, UrlRef("http://nowhere.test/a.png"))

    assert error.reason == "unreachable"


async def test_environment_proxies_are_ignored(
    server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    server.routes["/a.png"] = reply(200, b"direct")
    async with make_fetcher() as fetcher:
        assert await fetcher.fetch(UrlRef(server.url("/a.png"))) == b"direct"


# --- addresses ---------------------------------------------------------------------------


async def test_a_literal_private_address_is_refused(server: LocalServer) -> None:
    text = server.url("/a.png")
    v = Violations()

    assert parse_reference(text, "params.base_image_url", v, ReferencePolicy((), False)) is None
    assert [violation.field for violation in v.items] == ["params.base_image_url"]

    # And should such a reference reach the fetcher anyway, it is refused there too.
    async with make_fetcher(allow_private_networks=False) as fetcher:
        error = await fetch_error(fetcher, UrlRef(text))

    assert error.reason == "forbidden"
    assert server.connections == 0


async def test_a_host_name_resolving_to_a_private_address_is_refused(
    server: LocalServer,
) -> None:
    dns = FakeDns(["127.0.0.1"])
    async with make_fetcher(allow_private_networks=False, resolve=dns) as fetcher:
        error = await fetch_error(fetcher, UrlRef(server.url("/a.png", host="images.test")))

    assert error.reason == "forbidden"
    assert str(error) == (
        "images.test resolves to a non-public address, "
        "and this server does not fetch from private networks"
    )
    assert dns.asked == [("images.test", server.port)]
    assert server.connections == 0


async def test_the_connection_goes_to_the_resolved_address_with_the_host_name_kept(
    server: LocalServer,
) -> None:
    server.routes["/a.png"] = reply(200, b"by name")
    dns = FakeDns(["127.0.0.1"])
    async with make_fetcher(allow_private_networks=True, resolve=dns) as fetcher:
        body = await fetcher.fetch(UrlRef(server.url("/a.png", host="images.test")))

    assert body == b"by name"
    assert dns.asked == [("images.test", server.port)]
    assert server.seen[0].headers["host"] == f"images.test:{server.port}"


async def test_one_private_answer_among_public_ones_is_refused(server: LocalServer) -> None:
    internet = PlayedInternet(server.port)
    dns = FakeDns([PUBLIC_IP, "10.0.0.7"])
    async with make_fetcher(
        allow_private_networks=False, resolve=dns, network_backend=internet
    ) as fetcher:
        error = await fetch_error(fetcher, UrlRef("http://images.test/a.png"))

    assert error.reason == "forbidden"
    assert internet.dialed == []


async def test_dns_rebinding_cannot_reach_a_private_address(server: LocalServer) -> None:
    # The host first resolves to a public address, then to loopback. The connection is
    # made to the address that was checked, never by name, so the second answer is never
    # used unchecked: it is checked on the next connection, and refused.
    server.routes["/a.png"] = reply(200, b"public image")
    internet = PlayedInternet(server.port)
    dns = FakeDns([PUBLIC_IP], ["127.0.0.1"])
    async with make_fetcher(
        allow_private_networks=False, resolve=dns, network_backend=internet
    ) as fetcher:
        first = await fetcher.fetch(UrlRef("http://images.test/a.png"))
        rebound = await fetch_error(fetcher, UrlRef("http://images.test/a.png"))

    assert first == b"public image"
    assert server.seen[0].headers["host"] == "images.test"
    assert rebound.reason == "forbidden"
    assert dns.asked == [("images.test", 80), ("images.test", 80)]
    assert internet.dialed == [(PUBLIC_IP, 80)]  # an address, never the name


async def test_a_redirect_to_a_private_address_is_refused(server: LocalServer) -> None:
    server.routes["/a.png"] = redirect("http://169.254.169.254/latest/meta-data/")
    internet = PlayedInternet(server.port)
    async with make_fetcher(
        allow_private_networks=False, resolve=FakeDns([PUBLIC_IP]), network_backend=internet
    ) as fetcher:
        error = await fetch_error(fetcher, UrlRef("http://images.test/a.png"))

    assert error.reason == "forbidden"
    assert str(error) == (  # refused as a redirect target, before any connection
        "http://169.254.169.254/latest/meta-data/ is refused: redirect 1 must not target a "
        "loopback, private, link-local, multicast, reserved or otherwise non-public address"
    )
    assert internet.dialed == [(PUBLIC_IP, 80)]


async def test_tls_still_names_the_host_when_connecting_by_address() -> None:
    tls = TlsRecorder()
    async with make_fetcher(
        allow_private_networks=False, resolve=FakeDns([PUBLIC_IP]), network_backend=tls
    ) as fetcher:
        error = await fetch_error(fetcher, UrlRef("https://images.test/a.png"))

    assert error.reason == "unreachable"  # the probe fails every handshake
    assert tls.dialed == [(PUBLIC_IP, 443)]
    assert tls.server_names == ["images.test"]  # SNI and certificate checks use the name


# --- lifecycle and the fake --------------------------------------------------------------


async def test_from_settings_applies_the_media_settings(server: LocalServer, root: Path) -> None:
    server.routes["/a.png"] = reply(200, b"x" * 11)
    (root / "small.png").write_bytes(b"small")
    media = MediaSettings(input_roots=(root,), allow_private_networks=True, max_input_bytes=10)
    async with Fetcher.from_settings(media) as fetcher:
        error = await fetch_error(fetcher, UrlRef(server.url("/a.png")))
        small = await fetcher.fetch(FileRef(root / "small.png"))

    assert error.reason == "too_large"
    assert small == b"small"


async def test_a_closed_fetcher_fetches_no_more(server: LocalServer) -> None:
    async with make_fetcher() as fetcher:
        pass

    with pytest.raises(RuntimeError):
        await fetcher.fetch(UrlRef(server.url("/a.png")))


async def test_the_fake_serves_bytes_and_errors_and_records_calls() -> None:
    refused = FetchError("forbidden", "no")
    fake = FakeFetcher({"https://images.test/a.png": b"a", "file:///in/b.png": refused})
    fetcher: InputFetcher = fake

    assert await fetcher.fetch(UrlRef("https://images.test/a.png")) == b"a"
    with pytest.raises(FetchError) as raised:
        await fetcher.fetch(FileRef(Path("/in/b.png")))
    assert raised.value is refused
    with pytest.raises(FetchError) as missing:
        await fetcher.fetch(UrlRef("https://images.test/c.png"))
    assert missing.value.reason == "not_found"

    assert fake.calls == [
        "https://images.test/a.png",
        "file:///in/b.png",
        "https://images.test/c.png",
    ]


async def test_the_fake_waits_for_its_gate() -> None:
    gate = asyncio.Event()
    fake = FakeFetcher({"https://images.test/a.png": b"a"}, gate=gate)

    async with asyncio.TaskGroup() as tasks:
        fetching = tasks.create_task(fake.fetch(UrlRef("https://images.test/a.png")))
        await asyncio.sleep(0)  # one turn of the loop: the fetch runs up to the gate
        assert fake.calls == ["https://images.test/a.png"]
        assert not fetching.done()
        gate.set()

    assert fetching.result() == b"a"
