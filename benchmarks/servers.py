"""Servers the harness measures, each run in its own process and printing its port.

python -m benchmarks.servers echo
python -m benchmarks.servers sartiq DIR hold|instant
python -m benchmarks.servers local DIR [lifted]
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import Any

import grpc

from server.app import App, freeze_heap
from server.compute.fake import FakeComputeBackend
from server.compute.local import LocalComputeBackend
from server.config import (
    DatabaseSettings,
    MediaSettings,
    OrchestrationSettings,
    ServerSettings,
    Settings,
)

ECHO_SERVICE = "bench.Echo"


def _identity(data: bytes) -> bytes:
    return data


async def _echo_unary(request: bytes, context: Any) -> bytes:
    return request


async def _echo_stream(request: bytes, context: Any) -> Any:
    count = int.from_bytes(request[:4], "big")
    for _ in range(count):
        yield request


class _Broadcast:
    """The least a server can do to fan a message out: a queue per subscribed stream."""

    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[bytes]] = set()

    async def subscribe(self, request: bytes, context: Any) -> Any:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.queues.add(queue)
        try:
            while (message := await queue.get()) != b"end":
                yield message
        finally:
            self.queues.discard(queue)

    async def publish(self, request: bytes, context: Any) -> bytes:
        """Hand the message to every stream (b"end" ends them); answers how many there are."""
        for queue in self.queues:
            queue.put_nowait(request)
        return len(self.queues).to_bytes(4, "big")


async def _serve_echo(stop: asyncio.Event) -> None:
    server = grpc.aio.server()
    broadcast = _Broadcast()
    handler = grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_echo_unary, _identity, _identity),
            "Stream": grpc.unary_stream_rpc_method_handler(_echo_stream, _identity, _identity),
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                broadcast.subscribe, _identity, _identity
            ),
            "Publish": grpc.unary_unary_rpc_method_handler(broadcast.publish, _identity, _identity),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await stop.wait()
    await server.stop(0)


async def _serve_sartiq(stop: asyncio.Event, root: Path, *, hold: bool) -> None:
    settings = Settings(
        server=ServerSettings(port=0, grace_period=0.5),
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{root / 'bench.db'}"),
        media=MediaSettings(artifact_dir=root / "artifacts"),
        # Creates against a holding backend pile up live generations: measure the service,
        # not the admission bound (the harness still counts back-pressure if it comes).
        orchestration=OrchestrationSettings(
            max_queued_generations=1_000_000, max_live_per_organization=1_000_000
        ),
    )
    async with App(settings, compute=FakeComputeBackend(hold=hold, retain_finished=1000)) as app:
        freeze_heap()  # as ``python -m server`` does once it serves
        print(app.port, flush=True)
        await stop.wait()
        stats = app.writer_stats
    # What the store did, for the harness: one JSON line after the port.
    print(json.dumps(dataclasses.asdict(stats)), flush=True)


async def _serve_local(stop: asyncio.Event, root: Path, *, lifted: bool) -> None:
    """The embedded default of ``make run``: SQLite, the real local compute backend.

    Only the port and the directories differ from the defaults, and with ``lifted`` the
    admission limits (so that no create is refused while the renders fall behind).
    """
    orchestration = OrchestrationSettings()
    if lifted:
        orchestration = OrchestrationSettings(
            max_queued_generations=1_000_000, max_live_per_organization=1_000_000
        )
    settings = Settings(
        server=ServerSettings(port=0, grace_period=0.5),
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{root / 'bench.db'}"),
        media=MediaSettings(artifact_dir=root / "artifacts"),
        orchestration=orchestration,
    )
    async with App(settings) as app:
        freeze_heap()  # as ``python -m server`` does once it serves
        compute = app.compute
        if not isinstance(compute, LocalComputeBackend):
            raise RuntimeError("the embedded default is the local backend")

        def counts() -> None:  # SIGUSR1: the tasks so far, for the harness
            partial = root / "compute.json.partial"
            partial.write_text(json.dumps({"created": compute.created, "ended": compute.ended}))
            partial.rename(root / "compute.json")

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, counts)
        print(app.port, flush=True)
        await stop.wait()
        stats = app.writer_stats
    print(json.dumps(dataclasses.asdict(stats)), flush=True)


async def _main(argv: list[str]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if argv[0] == "echo":
        await _serve_echo(stop)
    elif argv[0] == "local":
        await _serve_local(stop, Path(argv[1]), lifted=argv[2:] == ["lifted"])
    else:
        await _serve_sartiq(stop, Path(argv[1]), hold=argv[2:] == ["hold"])


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1:]))
