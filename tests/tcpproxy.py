"""A TCP proxy for faults below any protocol: cut, refuse, or silence connections.

It sits between a client and a server (PostgreSQL, for the listening connection):

* ``cut()`` closes every open connection, as a restarted server or a dropped path would;
* ``refuse()`` closes each new connection at once, until ``accept()``;
* ``freeze()`` stops forwarding bytes on the connections open now, in both directions,
  without closing them: a path that died without a word, which only a probe that gets
  no answer can tell (or, with ``thaw()`` later, one that was slow for a while: the
  bytes held arrive then, in order). Connections made afterwards work.

``connections`` counts the connections it forwarded, ``refused`` those it turned away.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field


@dataclass
class _Link:
    writers: list[asyncio.StreamWriter]
    moving: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream_host``:``upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._links: list[_Link] = []
        self._refusing = False
        self.port = 0
        self.connections = 0
        self.refused = 0

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        tasks = [task for link in self._links for task in link.tasks]
        for task in tasks:
            task.cancel()  # a frozen link's pumps wait for a thaw that will not come
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def open_connections(self) -> int:
        """How many forwarded connections are still open."""
        return sum(1 for link in self._links if not link.writers[0].is_closing())

    def cut(self) -> None:
        """Close every open connection."""
        for link in self._links:
            link.close()

    def refuse(self) -> None:
        """Close new connections at once."""
        self._refusing = True

    def accept(self) -> None:
        """Forward new connections again."""
        self._refusing = False

    def freeze(self) -> None:
        """Stop moving bytes on the connections open now, leaving them open."""
        for link in self._links:
            link.moving.clear()

    def thaw(self) -> None:
        """Move the bytes held by ``freeze`` on, and forward as usual again."""
        for link in self._links:
            link.moving.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.refused += 1
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            return
        self.connections += 1
        link = _Link([writer, up_writer])
        link.moving.set()
        self._links.append(link)
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, link)),
            asyncio.create_task(self._pump(up_reader, writer, link)),
        ]

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                await link.moving.wait()
                writer.write(data)
                await writer.drain()
        link.close()
