"""ArtifactService: bytes in and out over gRPC only, content-addressed, owned per tenant."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import make_settings
from helpers import assert_eventually, field_violations, wait_terminal
from PIL import Image

from sartiq_grpc import errors
from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2 as pb
from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2_grpc, enums_pb2
from sartiq_grpc.sartiq.generation.v1.generation_service_pb2 import GetCapabilitiesRequest
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ApiKey, AuthSettings, Settings
from server.media.artifacts import FileArtifactStore
from server.media.spool import SpoolFile

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"


def two_tenants(tmp_path: Path) -> Settings:
    settings = make_settings(tmp_path)
    keys = (ApiKey(organization="org-a", key=KEY_A), ApiKey(organization="org-b", key=KEY_B))
    return settings.model_copy(update={"auth": AuthSettings(api_keys=keys)})


def noise_png(side: int, seed: int = 7) -> bytes:
    """A PNG of random pixels, stored uncompressed: about 3 x side^2 bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


async def _cut_download(client: SartiqClient, sha256: str, path: Path, keep: int) -> int:
    """Start a download, keep only ``keep`` bytes of its first message, then hang up."""
    call = client.artifacts.DownloadArtifact(
        pb.DownloadArtifactRequest(sha256=sha256),
        metadata=(("authorization", f"Bearer {KEY_A}"),),
    )
    first = await call.read()
    call.cancel()
    assert isinstance(first, pb.DownloadArtifactResponse)
    assert first.offset == 0
    assert first.artifact.sha256 == sha256
    await asyncio.to_thread(path.write_bytes, first.chunk[:keep])
    return keep


async def test_upload_generate_download_over_grpc_only(tmp_path: Path) -> None:
    # The real local backend, so the output is really made from the uploaded image.
    async with App(two_tenants(tmp_path)) as app:
        target = f"127.0.0.1:{app.port}"
        async with (
            SartiqClient(target, api_key=KEY_A) as a,
            SartiqClient(target, api_key=KEY_B) as b,
        ):
            data = noise_png(3200)
            assert len(data) > 30_000_000
            uploaded = await a.upload(data)
            assert uploaded.sha256 == hashlib.sha256(data).hexdigest()
            assert (uploaded.mime_type, uploaded.width, uploaded.height) == (
                "image/png",
                3200,
                3200,
            )
            assert uploaded.size_bytes == len(data)

            product = await a.create_entity("product", "noise", artifacts=[uploaded.sha256])
            generation = await a.generate(
                product_id=product.id, shot_type_string="front", width=512, height=512, seed=3
            )
            done = await wait_terminal(a.generations, generation.id, metadata=_auth(KEY_A))
            assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED
            output = done.predictions[0].artifact
            assert uploaded.sha256 in output.recipe.input_sha256

            # Download, cut mid-way, resume from the bytes received.
            path = tmp_path / "out.png"
            kept = await _cut_download(a, output.sha256, path, keep=output.size_bytes // 3)
            assert 0 < kept < output.size_bytes
            await a.download(output.sha256, path)
            stored = app.settings.media.artifact_dir / output.sha256[:2] / f"{output.sha256}.png"
            assert path.read_bytes() == stored.read_bytes()
            assert hashlib.sha256(path.read_bytes()).hexdigest() == output.sha256

            # The upload itself comes back byte for byte, in 1 MiB chunks.
            back = tmp_path / "back.png"
            await a.download(uploaded.sha256, back)
            assert back.read_bytes() == data

            # Another tenant sees neither the upload nor the output, even by hash.
            for sha in (uploaded.sha256, output.sha256):
                with pytest.raises(errors.NotFoundError):  # the client's error tree
                    await b.download(sha, tmp_path / "stolen")
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await b.artifacts.GetArtifact(
                        pb.GetArtifactRequest(sha256=sha), metadata=_auth(KEY_B)
                    )
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(errors.NotFoundError):
                await b.create_entity("product", "theft", artifacts=[output.sha256])


def _auth(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[SartiqClient]:
    async with (
        App(make_settings(tmp_path), compute=FakeComputeBackend()) as app,
        SartiqClient(f"127.0.0.1:{app.port}") as connected,
    ):
        yield connected


async def _upload_error(
    client: SartiqClient, messages: list[pb.UploadArtifactRequest]
) -> grpc.aio.AioRpcError:
    async def stream() -> AsyncIterator[pb.UploadArtifactRequest]:
        for message in messages:
            yield message

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.artifacts.UploadArtifact(stream())
    return caught.value


def _header(**fields: object) -> pb.UploadArtifactRequest:
    return pb.UploadArtifactRequest(header=pb.UploadArtifactHeader(**fields))  # type: ignore[arg-type]


def _chunk(data: bytes) -> pb.UploadArtifactRequest:
    return pb.UploadArtifactRequest(chunk=data)


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([_chunk(b"x")], "header"),
        ([_header(), _header()], "header"),
        ([_header(), _chunk(b"x" * (1024 * 1024 + 1))], "chunk"),
        ([_header()], "content"),
        ([_header(), _chunk(b"not an image at all")], "content"),
        ([_header(size_bytes=10**12)], "header.size_bytes"),
        ([_header(sha256="ab")], "header.sha256"),
        ([_header(size_bytes=5), _chunk(noise_png(8))], "header.size_bytes"),
        ([_header(sha256="0" * 64), _chunk(noise_png(8))], "header.sha256"),
    ],
)
async def test_bad_uploads_are_refused_and_leave_nothing(
    client: SartiqClient,
    tmp_path: Path,
    messages: list[pb.UploadArtifactRequest],
    field: str,
) -> None:
    error = await _upload_error(client, messages)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error)
    leftovers = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert leftovers == []


async def test_uploading_the_same_bytes_twice_is_one_artifact(client: SartiqClient) -> None:
    data = noise_png(32)
    first = await client.upload(data)
    second = await client.upload(data)
    assert first == second
    got = await client.artifacts.GetArtifact(pb.GetArtifactRequest(sha256=first.sha256))
    assert got.artifact == first


async def test_download_offsets_are_checked(client: SartiqClient, tmp_path: Path) -> None:
    uploaded = await client.upload(noise_png(16))
    call = client.artifacts.DownloadArtifact(
        pb.DownloadArtifactRequest(sha256=uploaded.sha256, offset=uploaded.size_bytes + 1)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "offset" in field_violations(caught.value)
    # At the very end: one message, no bytes, still naming the artifact.
    at_end = [
        item
        async for item in client.artifacts.DownloadArtifact(
            pb.DownloadArtifactRequest(sha256=uploaded.sha256, offset=uploaded.size_bytes)
        )
    ]
    assert [(m.offset, m.chunk, m.artifact.sha256) for m in at_end] == [
        (uploaded.size_bytes, b"", uploaded.sha256)
    ]
    with pytest.raises(errors.NotFoundError) as unknown:
        await client.download("f" * 64, tmp_path / "x")
    assert unknown.value.ids == {"sha256": "f" * 64}


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_uploads_cancelled_at_any_moment_leave_no_file_or_descriptor(
    client: SartiqClient, tmp_path: Path
) -> None:
    data = noise_png(40)  # about 5 KB, sent in 1 KiB chunks
    chunks = [data[i : i + 1024] for i in range(0, len(data), 1024)]
    header = pb.UploadArtifactRequest(header=pb.UploadArtifactHeader(size_bytes=len(data)))
    await client.upload(data)  # the first upload makes the directories and threads
    root = tmp_path / "artifacts"
    before = _open_descriptors()
    rng = random.Random(15)
    plans = [rng.randint(0, len(chunks)) for _ in range(500)]
    # 64 at once keep the server's threads busy, so cancels land at every step of an
    # upload (creating its file included), not only between chunks.
    slots = asyncio.Semaphore(64)

    async def cancelled(sent: int) -> None:
        async with slots:
            call = client.artifacts.UploadArtifact()  # type: ignore[call-arg]  # write() API
            await call.write(header)
            for chunk in chunks[:sent]:
                await call.write(pb.UploadArtifactRequest(chunk=chunk))
            call.cancel()  # right after the header when sent == 0

    await asyncio.gather(*(cancelled(sent) for sent in plans))
    assert plans.count(0) > 10

    async def nothing_left() -> bool:
        leftovers = await asyncio.to_thread(lambda: list(root.rglob(".tmp-*")))
        return not leftovers and _open_descriptors() <= before

    await assert_eventually(nothing_left, timeout=20)
    # And the store still takes uploads.
    assert (await client.upload(noise_png(24))).size_bytes > 0


class HeldDisk(FileArtifactStore):
    """A disk that is slow to create an upload's file: ``open`` returns when released."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.opened = threading.Event()
        self.release = threading.Event()

    def spool(self) -> SpoolFile:
        disk = self

        class Held(SpoolFile):
            def open(self) -> None:
                super().open()
                disk.opened.set()
                disk.release.wait(timeout=30)  # a safety net; the test releases it

        return Held(self.root / "incoming")


async def test_a_cancel_while_the_file_is_created_leaves_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    disk = HeldDisk(settings.media.artifact_dir)
    temporary = disk.root / "incoming"
    async with (
        App(settings, compute=FakeComputeBackend(), artifacts=disk) as app,
        SartiqClient(f"127.0.0.1:{app.port}") as client,
    ):
        await client.generations.GetCapabilities(GetCapabilitiesRequest())  # connects
        before = _open_descriptors()
        try:
            call = client.artifacts.UploadArtifact()  # type: ignore[call-arg]  # write() API
            await call.write(pb.UploadArtifactRequest(header=pb.UploadArtifactHeader()))

            async def opened() -> bool:
                return disk.opened.is_set()

            await assert_eventually(opened)
            assert len(list(temporary.glob(".tmp-*"))) == 1
            call.cancel()  # the server is still waiting for its file to be created

            async def removed() -> bool:
                return not await asyncio.to_thread(lambda: list(temporary.glob(".tmp-*")))

            await assert_eventually(removed)
        finally:
            disk.release.set()

        async def closed() -> bool:
            return _open_descriptors() <= before

        await assert_eventually(closed)


async def test_an_upload_cut_by_a_server_stop_leaves_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    temporary = settings.media.artifact_dir / "incoming"

    async def leftovers() -> list[Path]:
        return await asyncio.to_thread(lambda: list(temporary.glob(".tmp-*")))

    async with App(settings, compute=FakeComputeBackend()) as app:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
        call = stub.UploadArtifact()  # type: ignore[call-arg]  # write() API
        await call.write(pb.UploadArtifactRequest(header=pb.UploadArtifactHeader()))
        await call.write(pb.UploadArtifactRequest(chunk=noise_png(8)))

        async def receiving() -> bool:
            return bool(await leftovers())

        await assert_eventually(receiving)
    try:
        # The server stopped with the upload unfinished: its file goes with it.
        async def gone() -> bool:
            return not await leftovers()

        await assert_eventually(gone)
    finally:
        await channel.close(grace=None)
