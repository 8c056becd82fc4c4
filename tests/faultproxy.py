"""A fault-injecting HTTP/1.1 proxy: a real socket between the adapter and the compute server.

Each request from the client is read whole, matched against the scripted faults (the
first one whose method and path prefix match is used up), and then forwarded to the
upstream server on a fresh connection, answered in its place, or broken:

* ``Fault.error(500)``: answer the status without forwarding (a JSON error body; for
  502 an HTML page, as a gateway would send);
* ``Fault.reset()``: close the connection without an answer, without forwarding;
* ``Fault.drop()``: forward (the server does the work), then close without the answer;
* ``Fault.slow(s)``: forward, then answer after ``s`` seconds;
* ``Fault.hang(s)``: forward, then hold the answer ``s`` seconds and close (a timeout);
* ``Fault.twice()``: deliver the request to the server twice, answer the first reply;
* ``Fault.forget()``: answer 404 as a server that lost the task would.

``refuse()`` closes the listening socket (connections are refused) until ``accept()``.
``requests`` records every (method, path) the proxy received, ``bodies`` their bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field


@dataclass
class Fault:
    """One scripted fault for the next request matching ``method`` and ``prefix``."""

    kind: str
    method: str = ""
    prefix: str = ""
    status: int = 0
    seconds: float = 0.0

    @classmethod
    def error(cls, status: int, method: str = "", prefix: str = "") -> Fault:
        return cls("error", method, prefix, status=status)

    @classmethod
    def reset(cls, method: str = "", prefix: str = "") -> Fault:
        return cls("reset", method, prefix)

    @classmethod
    def drop(cls, method: str = "", prefix: str = "") -> Fault:
        return cls("drop", method, prefix)

    @classmethod
    def slow(cls, seconds: float, method: str = "", prefix: str = "") -> Fault:
        return cls("slow", method, prefix, seconds=seconds)

    @classmethod
    def hang(cls, seconds: float, method: str = "", prefix: str = "") -> Fault:
        return cls("hang", method, prefix, seconds=seconds)

    @classmethod
    def twice(cls, method: str = "", prefix: str = "") -> Fault:
        return cls("twice", method, prefix)

    @classmethod
    def forget(cls, method: str = "GET", prefix: str = "/api/v1/tasks/") -> Fault:
        return cls("forget", method, prefix)

    def matches(self, method: str, path: str) -> bool:
        return (not self.method or self.method == method) and path.startswith(self.prefix)


@dataclass
class FaultProxy:
    """Listens on 127.0.0.1 and forwards to ``upstream_port``."""

    upstream_port: int
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> int:
        """Listen (on the port used before, if any); returns the port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def refuse(self) -> None:
        """Stop listening and cut open connections: new connections are refused."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for handler in list(self._handlers):
            handler.cancel()

    async def accept(self) -> None:
        """Listen again on the same port."""
        await self.start()

    async def close(self) -> None:
        await self.refuse()

    def _take(self, method: str, path: str) -> Fault | None:
        for index, fault in enumerate(self.faults):
            if fault.matches(method, path):
                return self.faults.pop(index)
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                method, path, raw = request
                self.requests.append((method, path))
                self.bodies.append(raw.partition(b"\r\n\r\n")[2])
                if not await self._answer(method, path, raw, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._handlers.discard(task)
            writer.transport.abort()

    async def _answer(
        self, method: str, path: str, raw: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        """Handle one request; False when the client connection must be closed."""
        fault = self._take(method, path)
        kind = fault.kind if fault else ""
        if kind == "reset":
            return False
        if kind in ("error", "forget"):
            status = 404 if kind == "forget" else fault.status if fault else 500
            category = "transient" if status >= 500 else "validation"
            category = "not_found" if kind == "forget" else category
            body = {"error_category": category, "error_message": f"injected {status}"}
            # A 502 comes from a gateway in front of the server: HTML, no category.
            payload = b"<html>Bad Gateway</html>" if status == 502 else json.dumps(body).encode()
            writer.write(_response(status, payload))
            await writer.drain()
            return True
        answer = await self._forward(raw)
        if kind == "twice":
            await self._forward(raw)
        if kind == "drop":
            return False
        if kind in ("slow", "hang") and fault is not None:
            await asyncio.sleep(fault.seconds)
            if kind == "hang":
                return False
        writer.write(answer)
        await writer.drain()
        return b"connection: close" not in answer.split(b"\r\n\r\n", 1)[0].lower()

    async def _forward(self, raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            writer.write(_with_close(raw))
            await writer.drain()
            return await reader.read()  # until the server closes (Connection: close)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    body = await reader.readexactly(length) if length else b""
    return method, path, head + body


def _with_close(raw: bytes) -> bytes:
    """The request with ``Connection: close``, so the upstream answer ends at EOF."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body


def _response(status: int, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} Injected\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
