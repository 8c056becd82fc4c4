"""A fault-injecting HTTP/1.1 proxy: a real socket between the adapter and the compute server.

Each request from the client is read whole, classified as one call of the wire protocol
(``call_of``: submit, lookup, status, events, output, cancel, evaluation, health), matched
against the scripted faults (the first one whose call, method and path prefix match is
used), and then forwarded to the upstream server on a fresh connection, answered in its
place, broken, or forwarded and its answer corrupted:

* ``Fault.error(500)``: answer the status without forwarding (a JSON error body; for
  502 an HTML page, as a gateway would send);
* ``Fault.reset()``: close the connection without an answer, without forwarding;
* ``Fault.drop()``: forward (the server does the work), then close without the answer;
* ``Fault.slow(s)``: forward, then answer after ``s`` seconds;
* ``Fault.hang(s)``: forward, then hold the answer ``s`` seconds and close (a timeout);
* ``Fault.twice()``: deliver the request to the server twice, answer the first reply;
* ``Fault.forget()``: answer 404 as a server that lost the task would;
* ``Fault.answer(payload)``: forward, then answer ``payload`` (200, JSON unless told)
  instead: JSON that is not an object, an object without its fields, an HTML page...;
* ``Fault.truncate()``: forward, then answer the first half of the body (its length
  header says so: a well-formed answer with a short body);
* ``Fault.bitflip()``: forward, then answer the body with one bit flipped;
* ``Fault.content_type(value)``: forward, then answer with that content type;
* ``Fault.rewrite(change)``: forward, then answer ``change(body)``; when ``change``
  returns None the answer passes untouched and the fault waits for the next one.

Answers are read whole, but for a task's events stream (a chunked answer to the events
call), which is passed on as it arrives, one block (an event or a keep-alive comment) at
a time, so that push can be measured through the proxy. The faults keep their meaning
there: ``truncate`` passes the first block and half the next, then cuts the connection
(a stream cut mid-event); ``bitflip`` flips a bit in the first event's data; ``hang``
passes the first block, then nothing (not even keep-alives) for ``s`` seconds, and
cuts; ``slow`` holds the stream ``s`` seconds before it starts; ``drop`` cuts it before
it starts; ``twice`` passes its first event twice (a replay, number and all);
``rewrite`` changes the data of every event it returns something for (when it returns
nothing for any, it waits for the next stream); ``answer`` and ``content_type`` replace
the answer or its content type. An answer to the events call that is not a stream (an
error answer) is handled as any other.

A fault is used up by the request it hits, unless ``times`` says otherwise (None: it
applies to every matching request). ``chaos(rate, seed)`` adds random faults: each
request not hit by a scripted fault is faulted with probability ``rate``, with a fault
drawn from those that fit its call; each call has its own seeded generator, so the n-th
status request meets the same fate in every run. ``refuse()`` closes the listening
socket until ``accept()``. ``requests`` records every (method, path), ``bodies`` their
bodies, ``injected`` every (call, fault kind) applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

Times = int | None  # how many matching requests a fault hits; None: every one

_CALLS = (
    ("lookup", "GET", re.compile(r"/api/v1/tasks/\?.*")),
    ("submit", "POST", re.compile(r"/api/v1/tasks/")),
    ("events", "GET", re.compile(r"/api/v1/tasks/[^/?]+/events")),
    ("output", "GET", re.compile(r"/api/v1/tasks/[^/?]+/outputs/\d+")),
    ("cancel", "POST", re.compile(r"/api/v1/tasks/[^/?]+/cancel")),
    ("status", "GET", re.compile(r"/api/v1/tasks/[^/?]+")),
    ("evaluation", "POST", re.compile(r"/api/v1/evaluation/")),
    ("health", "GET", re.compile(r"/health")),
)


def call_of(method: str, path: str) -> str:
    """Which call of the wire protocol a request is ("" when none)."""
    for name, verb, pattern in _CALLS:
        if method == verb and pattern.fullmatch(path):
            return name
    return ""


@dataclass
class Fault:
    """One scripted fault for the next request(s) matching ``call``, ``method``, ``prefix``."""

    kind: str
    method: str = ""
    prefix: str = ""
    status: int = 0
    seconds: float = 0.0
    call: str = ""
    payload: bytes = b""
    content: str = "application/json"
    change: Callable[[bytes], bytes | None] | None = None
    times: Times = 1

    @classmethod
    def error(
        cls, status: int, method: str = "", prefix: str = "", *, call: str = "", times: Times = 1
    ) -> Fault:
        return cls("error", method, prefix, status=status, call=call, times=times)

    @classmethod
    def reset(
        cls, method: str = "", prefix: str = "", *, call: str = "", times: Times = 1
    ) -> Fault:
        return cls("reset", method, prefix, call=call, times=times)

    @classmethod
    def drop(cls, method: str = "", prefix: str = "", *, call: str = "", times: Times = 1) -> Fault:
        return cls("drop", method, prefix, call=call, times=times)

    @classmethod
    def slow(cls, seconds: float, method: str = "", prefix: str = "", *, call: str = "") -> Fault:
        return cls("slow", method, prefix, seconds=seconds, call=call)

    @classmethod
    def hang(cls, seconds: float, method: str = "", prefix: str = "", *, call: str = "") -> Fault:
        return cls("hang", method, prefix, seconds=seconds, call=call)

    @classmethod
    def twice(cls, method: str = "", prefix: str = "", *, call: str = "") -> Fault:
        return cls("twice", method, prefix, call=call)

    @classmethod
    def forget(
        cls,
        method: str = "GET",
        prefix: str = "/api/v1/tasks/",
        *,
        call: str = "",
        times: Times = 1,
    ) -> Fault:
        return cls("forget", method, prefix, call=call, times=times)

    @classmethod
    def answer(
        cls,
        payload: bytes,
        *,
        call: str,
        content: str = "application/json",
        times: Times = 1,
    ) -> Fault:
        return cls("answer", call=call, payload=payload, content=content, times=times)

    @classmethod
    def truncate(cls, *, call: str, times: Times = 1) -> Fault:
        return cls("truncate", call=call, times=times)

    @classmethod
    def bitflip(cls, *, call: str, times: Times = 1) -> Fault:
        return cls("bitflip", call=call, times=times)

    @classmethod
    def content_type(cls, content: str, *, call: str, times: Times = 1) -> Fault:
        return cls("content_type", call=call, content=content, times=times)

    @classmethod
    def rewrite(
        cls, change: Callable[[bytes], bytes | None], *, call: str, times: Times = 1
    ) -> Fault:
        return cls("rewrite", call=call, change=change, times=times)

    def matches(self, method: str, path: str) -> bool:
        return (
            (not self.method or self.method == method)
            and path.startswith(self.prefix)
            and (not self.call or self.call == call_of(method, path))
        )


# JSON that is valid but not an object, and objects without the fields a call needs.
NOT_OBJECTS = (b"null", b"42", b'"ok"', b"[]", b"{}")
NO_FIELDS = (b'{"status": "completed"}', b'{"id": "local-x", "status": "running"}')


def chaos_faults(call: str, rng: random.Random) -> Fault:
    """A random fault that fits ``call``: broken transport, error answers, or mangled bodies."""
    corrupt = [
        Fault.truncate(call=call),
        Fault.bitflip(call=call),
        Fault.content_type("text/html", call=call),
    ]
    broken = [Fault.error(503, call=call), Fault.error(502, call=call), Fault.reset(call=call)]
    if call == "output":
        mangled = [Fault.answer(b"<html>not an image</html>", call=call, content="image/png")]
    else:
        mangled = [Fault.answer(rng.choice(NOT_OBJECTS + NO_FIELDS), call=call)]
    if call in ("submit", "cancel"):
        broken.append(Fault.drop(call=call))  # done by the server, answer lost
    return rng.choice(broken + corrupt + mangled)


@dataclass
class FaultProxy:
    """Listens on 127.0.0.1 and forwards to ``upstream_port`` (and ``also``, round robin).

    With ``also``, each request goes to the next server: a load balancer in front of them.
    """

    upstream_port: int
    also: tuple[int, ...] = ()
    faults: list[Fault] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    injected: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _chaos_rate: float = 0.0
    _chaos: dict[str, random.Random] = field(default_factory=dict)
    _seed: int = 0
    _forwarded: int = 0

    async def start(self) -> int:
        """Listen (on the port used before, if any); returns the port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def chaos(self, rate: float, seed: int) -> None:
        """Fault a ``rate`` share of the requests at random (0 stops it)."""
        self._chaos_rate = rate
        self._seed = seed
        self._chaos.clear()

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
                if fault.times is not None:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.pop(index)
                return fault
        call = call_of(method, path)
        if self._chaos_rate and call:
            rng = self._chaos.setdefault(call, random.Random(f"{self._seed}:{call}"))
            if rng.random() < self._chaos_rate:
                return chaos_faults(call, rng)
        return None

    def _keep(self, fault: Fault) -> None:
        """Put back a fault that did not apply to this answer."""
        if fault.times is not None:
            fault.times += 1
            if fault not in self.faults:
                self.faults.insert(0, fault)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                request = await _read_request(reader, writer)
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
        if fault is not None and kind != "rewrite":
            self.injected.append((call_of(method, path), kind))
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
        if call_of(method, path) == "events":
            upstream = await _Upstream.open(self._next_upstream(), raw)
            try:
                if upstream.chunked:
                    return await self._stream(upstream, fault, method, path, writer)
                answer = upstream.head + await upstream.reader.read()
            finally:
                upstream.close()
        else:
            answer = await self._forward(raw)
        if kind == "twice":
            await self._forward(raw)
        if kind == "drop":
            return False
        if kind in ("slow", "hang") and fault is not None:
            await asyncio.sleep(fault.seconds)
            if kind == "hang":
                return False
        if fault is not None:
            answer = self._corrupt(fault, method, path, answer)
        writer.write(answer)
        await writer.drain()
        return b"connection: close" not in answer.split(b"\r\n\r\n", 1)[0].lower()

    def _corrupt(self, fault: Fault, method: str, path: str, answer: bytes) -> bytes:
        """The upstream answer as the fault mangles it."""
        head, body = _split(answer)
        if fault.kind == "answer":
            return _join(_with_header(head, "content-type", fault.content), fault.payload)
        if fault.kind == "truncate":
            return _join(head, body[: len(body) // 2])
        if fault.kind == "bitflip" and body:
            at = random.Random(len(self.requests)).randrange(len(body))
            flipped = bytearray(body)
            flipped[at] ^= 1 << (len(self.requests) % 8)
            return _join(head, bytes(flipped))
        if fault.kind == "content_type":
            return _join(_with_header(head, "content-type", fault.content), body)
        if fault.kind == "rewrite" and fault.change is not None:
            changed = fault.change(body)
            if changed is None:
                self._keep(fault)
                return answer
            self.injected.append((call_of(method, path), "rewrite"))
            return _join(head, changed)
        return answer

    async def _stream(
        self,
        upstream: _Upstream,
        fault: Fault | None,
        method: str,
        path: str,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Pass an events stream on block by block, as ``fault`` breaks it."""
        kind = fault.kind if fault else ""
        head, _ = _split(upstream.head)
        if kind == "drop":
            return False
        if kind == "slow" and fault is not None:
            await asyncio.sleep(fault.seconds)
        if kind == "answer" and fault is not None:
            writer.write(_join(_with_header(head, "content-type", fault.content), fault.payload))
            await writer.drain()
            return False
        if kind == "content_type" and fault is not None:
            head = _with_header(head, "content-type", fault.content)
        writer.write(b"\r\n".join(head) + b"\r\n\r\n")
        await writer.drain()
        rewritten = False
        blocks = 0
        try:
            async for block in upstream.blocks():
                blocks += 1
                if kind == "truncate" and blocks == 2:
                    writer.write(_chunk(block[: len(block) // 2]))
                    await writer.drain()
                    return False
                if kind == "bitflip" and blocks == 1:
                    block = _flip_data(block, len(self.requests))
                if kind == "rewrite" and fault is not None and fault.change is not None:
                    changed = _rewrite_data(block, fault.change)
                    if changed is not None and not rewritten:
                        rewritten = True
                        self.injected.append((call_of(method, path), "rewrite"))
                    block = block if changed is None else changed
                writer.write(_chunk(block))
                if kind == "twice" and blocks == 1:
                    writer.write(_chunk(block))  # the event replayed, its number with it
                await writer.drain()
                if kind == "hang" and fault is not None:
                    await asyncio.sleep(fault.seconds)
                    return False
        finally:
            if kind == "rewrite" and fault is not None and not rewritten:
                self._keep(fault)  # no event of this stream was changed
        if kind == "truncate":
            return False  # the stream had one block: cut before its end
        if not upstream.complete:
            return False  # the server cut it: so does the proxy
        writer.write(_chunk(b""))
        await writer.drain()
        return b"connection: close" not in upstream.head.lower()

    def _next_upstream(self) -> int:
        """The port the next request goes to (round robin when there are several)."""
        upstreams = (self.upstream_port, *self.also)
        self._forwarded += 1
        return upstreams[self._forwarded % len(upstreams)]

    async def _forward(self, raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self._next_upstream())
        try:
            writer.write(_with_close(raw))
            await writer.drain()
            return await reader.read()  # until the server closes (Connection: close)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@dataclass
class _Upstream:
    """A request forwarded to the server, its answer's head read; the body still to come."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    head: bytes
    complete: bool = False  # the chunked body was read to its end

    @classmethod
    async def open(cls, port: int, raw: bytes) -> _Upstream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_with_close(raw))
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            head = exc.partial  # no whole head: passed on as it is
        return cls(reader, writer, head)

    @property
    def chunked(self) -> bool:
        head, _ = _split(self.head)
        return any(
            line.lower().startswith(b"transfer-encoding:") and b"chunked" in line.lower()
            for line in head
        )

    async def blocks(self) -> AsyncIterator[bytes]:
        """The body's blocks (each an event or a comment, with its blank line) as they come.

        Ends at the body's end (``complete``) or where the server cut the connection.
        """
        pending = b""
        try:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    self.complete = True
                    break
                pending += await self.reader.readexactly(size)
                await self.reader.readexactly(2)
                while (end := _block_end(pending)) > 0:
                    yield pending[:end]
                    pending = pending[end:]
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        if pending:
            yield pending

    def close(self) -> None:
        self.writer.transport.abort()


def _block_end(data: bytes) -> int:
    """Where the first block of an event stream ends (after its blank line); 0 if not yet."""
    ends = [at + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (at := data.find(sep)) >= 0]
    return min(ends, default=0)


def _chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body (the empty one ends it)."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _data_line(block: bytes) -> int:
    """The index of the ``data:`` line of an event block, -1 when it has none."""
    lines = block.split(b"\r\n")
    return next((n for n, line in enumerate(lines) if line.startswith(b"data:")), -1)


def _flip_data(block: bytes, seed: int) -> bytes:
    """The block with one bit flipped in its data (a comment passes untouched)."""
    lines = block.split(b"\r\n")
    at = _data_line(block)
    if at < 0 or len(lines[at]) <= len(b"data: "):
        return block
    line = bytearray(lines[at])
    rng = random.Random(seed)
    index = rng.randrange(len(b"data: "), len(line))
    line[index] ^= 1 << (seed % 8)
    lines[at] = bytes(line)
    return b"\r\n".join(lines)


def _rewrite_data(block: bytes, change: Callable[[bytes], bytes | None]) -> bytes | None:
    """The block with its data changed, or None when ``change`` leaves it alone."""
    lines = block.split(b"\r\n")
    at = _data_line(block)
    if at < 0:
        return None
    changed = change(lines[at][len(b"data:") :].strip())
    if changed is None:
        return None
    lines[at] = b"data: " + changed.replace(b"\n", b" ").replace(b"\r", b" ")
    return b"\r\n".join(lines)


async def _read_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[str, str, bytes] | None:
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
        if name.strip().lower() == "expect" and value.strip().lower() == "100-continue":
            # An S3 client waits for this before it sends a large body.
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
    body = await reader.readexactly(length) if length else b""
    return method, path, head + body


def _with_close(raw: bytes) -> bytes:
    """The request with ``Connection: close``, so the upstream answer ends at EOF."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = [
        line
        for line in head.split(b"\r\n")
        if not line.lower().startswith((b"connection:", b"expect:"))  # the body is here
    ]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body


def _split(answer: bytes) -> tuple[list[bytes], bytes]:
    """An upstream answer's status line and headers, and its body."""
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def _with_header(head: list[bytes], name: str, value: str) -> list[bytes]:
    kept = [line for line in head if not line.lower().startswith(name.encode() + b":")]
    return [*kept, f"{name}: {value}".encode()]


def _join(head: list[bytes], body: bytes) -> bytes:
    """An answer with ``body``, its content-length set to match."""
    lines = [*_with_header(head, "content-length", str(len(body)))]
    lines = [line for line in lines if not line.lower().startswith(b"transfer-encoding:")]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _response(status: int, body: bytes) -> bytes:
    head = (
        f"HTTP/1.1 {status} Injected\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body
