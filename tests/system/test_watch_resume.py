"""The client's watches ride out a server restart: every event exactly once, none lost.

A server process holds a generation's compute task, is killed with SIGKILL mid-watch,
and a new process on the same port and database resumes the generation and finishes it.
The watches, opened before the kill, reconnect by themselves from their last position.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from helpers import CatalogStub, GenerationStub, assert_eventually, create_product, watch_all
from procs import ServerProcess

from sartiq_grpc import replay
from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2, resources_pb2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _collect_until_terminal(
    events: AsyncIterator[resources_pb2.GenerationEvent],
    into: list[resources_pb2.GenerationEvent],
    generation_id: str,
) -> None:
    async for event in events:
        if event.generation_id != generation_id:
            continue
        into.append(event)
        if event.terminal:
            return


async def test_watches_resume_across_a_killed_server(tmp_path: Path) -> None:
    port = str(_free_port())
    first = ServerProcess.with_fake_compute(tmp_path, hold=True, SERVER__PORT=port)
    second = ServerProcess.with_fake_compute(tmp_path, hold=False, SERVER__PORT=port)
    await first.start()
    try:
        async with grpc.aio.insecure_channel(first.target) as channel:
            product_id = await create_product(CatalogStub(channel))
        async with SartiqClient(first.target) as client:
            generation = await client.generate(
                product_id=product_id, shot_type_string="front", width=64, height=64
            )
            one: list[resources_pb2.GenerationEvent] = []
            every: list[resources_pb2.GenerationEvent] = []
            watching = asyncio.gather(
                _collect_until_terminal(client.watch(generation.id), one, generation.id),
                _collect_until_terminal(
                    client.watch_generations(after_cursor=0), every, generation.id
                ),
            )

            async def submitted() -> bool:
                # Created, started, task submitted: the fake holds it from here.
                return len(one) >= 3 and len(every) >= 3

            await assert_eventually(submitted)
            await first.kill()
            await second.start()
            await asyncio.wait_for(watching, 60)
            async with grpc.aio.insecure_channel(second.target) as channel:
                stored = await watch_all(GenerationStub(channel), generation.id)
                done = (
                    await GenerationStub(channel).GetGeneration(
                        generation_service_pb2.GetGenerationRequest(generation_id=generation.id)
                    )
                ).generation
    finally:
        await first.kill()
        await second.stop()
    # Exactly the stored log, in order, through both watches: nothing lost, nothing twice.
    assert [e.sequence for e in one] == list(range(1, len(stored) + 1))
    assert one == stored
    assert every == stored
    cursors = [e.cursor for e in every]
    assert cursors == sorted(set(cursors))
    task = done.predictions[0].tasks[0]
    assert done.done
    assert task.attempt == 2  # the restart found its task lost and re-ran it
    tree = None
    for event in one:
        tree = replay.apply(tree, event)
    assert tree == done
