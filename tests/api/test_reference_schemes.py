"""An image reference's scheme is the same scheme in any case, from create to fetch.

``HTTP://LOCALHOST:...`` used to pass create as a host name, then skip the fetcher (whose
check was case-sensitive) and fail late as "cannot resolve". Every spelling now reaches
the guarded fetcher: refused there (or at create) exactly like the lower-case one, and
fetched when the policy allows it. Real server, real fetcher, the local CPU backend, and
an HTTP server on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from conftest import make_settings
from helpers import GenerationStub, field_violations, png_bytes, wait_terminal

from sartiq_grpc.sartiq.generation.v1 import enums_pb2, resources_pb2
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App

IMAGE = png_bytes((200, 40, 40), size=(64, 64))
SCHEMES = ("http", "HTTP", "Http")
NON_PUBLIC = (
    "must not target a loopback, private, link-local, multicast, reserved or otherwise "
    "non-public address"
)


@dataclass
class ImageServer:
    """Serves ``IMAGE`` for every GET on loopback, and records each request's target."""

    port: int = 0
    targets: list[str] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.targets.append(head.split(b" ")[1].decode())
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: image/png\r\n"
                + f"Content-Length: {len(IMAGE)}\r\n\r\n".encode()
                + IMAGE
            )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@pytest.fixture
async def images() -> AsyncIterator[ImageServer]:
    server = ImageServer()
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server


@contextlib.asynccontextmanager
async def _stub(tmp_path: Path, *, allow_private: bool) -> AsyncIterator[GenerationStub]:
    settings = make_settings(tmp_path)
    media = settings.media.model_copy(update={"allow_private_networks": allow_private})
    async with (
        App(settings.model_copy(update={"media": media})) as app,  # the real fetcher
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        yield GenerationStub(channel)


def _adjust(url: str) -> pb.CreateImageAdjustingGenerationRequest:
    params = resources_pb2.ImageAdjustingParams(base_image_url=url, brightness=0.2)
    return pb.CreateImageAdjustingGenerationRequest(params=params)


async def test_a_loopback_url_is_refused_in_any_case_of_its_scheme(
    tmp_path: Path, images: ImageServer
) -> None:
    async with _stub(tmp_path, allow_private=False) as stub:
        for scheme in SCHEMES:
            # A literal address is refused at create, whatever the scheme's case.
            url = f"{scheme}://127.0.0.1:{images.port}/look.png"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateImageAdjustingGeneration(_adjust(url))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
            assert field_violations(caught.value) == {"params.base_image_url": NON_PUBLIC}
            # A host name is checked where it is resolved: by the fetcher, on connecting.
            url = f"{scheme}://LOCALHOST:{images.port}/look.png"
            created = await stub.CreateImageAdjustingGeneration(_adjust(url))
            done = await wait_terminal(stub, created.generation.id, timeout=30)
            assert done.status == enums_pb2.GENERATION_STATUS_FAILED, url
            error = done.predictions[0].tasks[0].error
            assert (error.reason, error.metadata["cause"]) == ("INPUT_UNAVAILABLE", "forbidden")
    assert images.targets == []  # nothing reached the loopback server


async def test_an_allowed_url_is_fetched_in_any_case_of_its_scheme(
    tmp_path: Path, images: ImageServer
) -> None:
    async with _stub(tmp_path, allow_private=True) as stub:
        for scheme in SCHEMES:
            for host in ("127.0.0.1", "LocalHost"):
                url = f"{scheme}://{host}:{images.port}/{scheme}-{host}.png"
                created = await stub.CreateImageAdjustingGeneration(_adjust(url))
                done = await wait_terminal(stub, created.generation.id, timeout=30)
                problems = [p.error.message for p in done.predictions if p.HasField("error")]
                assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED, (url, problems)
                task = done.predictions[0].tasks[0]
                assert task.parameters.fields["base_image"].string_value.startswith("artifact:")
    assert sorted(images.targets) == sorted(
        f"/{scheme}-{host}.png" for scheme in SCHEMES for host in ("127.0.0.1", "LocalHost")
    )
