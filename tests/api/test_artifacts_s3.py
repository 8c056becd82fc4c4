"""The service with its artifacts in S3-compatible storage: every byte goes through the bucket.

A real S3-compatible server process (moto's); nothing is written to the artifact directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from conftest import COMPUTE_TOKEN, make_settings
from faultproxy import Fault, FaultProxy
from google.rpc import error_details_pb2
from helpers import assert_eventually, error_info, png_bytes, rich_status, wait_terminal
from s3 import S3Bucket
from test_artifacts import noise_png

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2
from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2 as pb
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, resources_pb2
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as gen
from sartiq_grpc.sartiq.generation.v1.generation_service_pb2 import GetCapabilitiesRequest
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ComputeSettings, MediaSettings, Settings


def _settings(tmp_path: Path, s3: S3Bucket, endpoint: str = "", **compute: str) -> Settings:
    inputs = tmp_path / "inputs"
    inputs.mkdir(exist_ok=True)
    base = make_settings(tmp_path).model_copy(
        update={
            "media": MediaSettings(artifact_dir=tmp_path / "artifacts", input_roots=(inputs,)),
            "compute": ComputeSettings(**compute),
        }
    )
    return s3.settings(base, tmp_path / "spool", endpoint)


async def _local_files(tmp_path: Path) -> list[Path]:
    """Files the service left on this machine: in the artifact directory or the spool."""

    def walk() -> list[Path]:
        roots = (tmp_path / "artifacts", tmp_path / "spool")
        return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]

    return await asyncio.to_thread(walk)


async def test_uploads_and_resumed_downloads_go_through_the_bucket(
    tmp_path: Path, s3: S3Bucket
) -> None:
    async with (
        App(_settings(tmp_path, s3), compute=FakeComputeBackend()) as app,
        SartiqClient(f"127.0.0.1:{app.port}") as client,
    ):
        data = noise_png(1500)  # about 6.8 MB: two parts of a multipart upload
        uploaded = await client.upload(data)
        assert uploaded.sha256 == hashlib.sha256(data).hexdigest()
        assert await s3.keys() == [s3.key(uploaded.sha256)]
        assert (await client.upload(data)).sha256 == uploaded.sha256  # stored once

        # Cut after the first chunk, then resume from the bytes kept.
        path = tmp_path / "back.png"
        call = client.artifacts.DownloadArtifact(pb.DownloadArtifactRequest(sha256=uploaded.sha256))
        first = await call.read()
        call.cancel()
        assert isinstance(first, pb.DownloadArtifactResponse)
        await asyncio.to_thread(path.write_bytes, first.chunk[:12345])
        await client.download(uploaded.sha256, path)
        assert await asyncio.to_thread(path.read_bytes) == data
        # Any offset, the end included.
        for offset in (1, 1024 * 1024, len(data) - 1, len(data)):
            got = [
                m
                async for m in client.artifacts.DownloadArtifact(
                    pb.DownloadArtifactRequest(sha256=uploaded.sha256, offset=offset)
                )
            ]
            assert b"".join(m.chunk for m in got) == data[offset:]
            assert got[0].offset == offset
    assert await s3.open_uploads() == []
    assert await _local_files(tmp_path) == []


@pytest.mark.parametrize("backend", ["local", "http"])
async def test_compute_reads_and_writes_through_the_bucket(
    tmp_path: Path, s3: S3Bucket, backend: str, request: pytest.FixtureRequest
) -> None:
    """Inputs read by compute (inlined for http), outputs, fetched files, catalog images."""
    compute = {"backend": backend}
    if backend == "http":
        compute |= {"url": request.getfixturevalue("compute_server"), "token": COMPUTE_TOKEN}
    settings = _settings(tmp_path, s3, **compute)
    fetched = png_bytes((20, 160, 40), size=(64, 96))
    await asyncio.to_thread((tmp_path / "inputs" / "in.png").write_bytes, fetched)
    async with App(settings) as app, SartiqClient(f"127.0.0.1:{app.port}") as client:
        uploaded = await client.upload(png_bytes((200, 30, 30), size=(96, 128)))
        inline = png_bytes((30, 30, 200))
        product = await client.create_entity(
            "product", "dress", images=[inline], artifacts=[uploaded.sha256]
        )
        made = await client.generate(
            product_id=product.id, shot_type_string="front", width=64, height=64, seed=1
        )
        # AGENTIC: the evaluator reads the output and the base image from the bucket.
        agentic = resources_pb2.Orchestration(type=enums_pb2.GENERATION_TYPE_AGENTIC)
        agentic.agentic.max_attempts = 1
        adjusted = await client.create(
            resources_pb2.ImageAdjustingParams(base_image_url=f"artifact:{uploaded.sha256}"),
            orchestration=agentic,
        )
        from_file = await client.create(
            resources_pb2.ImageAdjustingParams(
                base_image_url=(tmp_path / "inputs" / "in.png").as_uri(), brightness=0.2
            )
        )
        outputs = []
        for generation in (made, adjusted, from_file):
            done = await wait_terminal(client.generations, generation.id, timeout=60)
            assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED, done.error.message
            outputs.append(done.predictions[0].artifact)
        assert adjusted_evaluated(await _get(client, adjusted.id))
        inputs = [o.recipe.input_sha256 for o in outputs]
        assert uploaded.sha256 in inputs[0]
        assert uploaded.sha256 in inputs[1]
        assert hashlib.sha256(fetched).hexdigest() in inputs[2]
        keys = set(await s3.keys())
        known = {uploaded.sha256, hashlib.sha256(inline).hexdigest(), *inputs[2]}
        known |= {o.sha256 for o in outputs}
        assert keys == {s3.key(sha) for sha in known}
        for output in outputs:  # the bytes the bucket holds are the artifact
            path = tmp_path / f"{output.sha256}.out"
            await client.download(output.sha256, path)
            assert hashlib.sha256(await asyncio.to_thread(path.read_bytes)).hexdigest() == (
                output.sha256
            )
    assert await _local_files(tmp_path) == []


async def _get(client: SartiqClient, generation_id: str) -> resources_pb2.Generation:
    answer = await client.generations.GetGeneration(
        gen.GetGenerationRequest(generation_id=generation_id)
    )
    return answer.generation


def adjusted_evaluated(generation: resources_pb2.Generation) -> bool:
    """Whether the AGENTIC generation's one attempt was evaluated (its output was read)."""
    attempts = [a for p in generation.predictions for a in p.agentic.attempts]
    return (
        len(attempts) == 1
        and not attempts[0].HasField("error")
        and bool(attempts[0].evaluation.criteria)
    )


@pytest.fixture
async def proxy(s3: S3Bucket) -> AsyncIterator[FaultProxy]:
    chosen = FaultProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    await chosen.start()
    yield chosen
    await chosen.close()


async def test_cancelled_uploads_leave_no_object_no_multipart_and_no_spool(
    tmp_path: Path, s3: S3Bucket, proxy: FaultProxy
) -> None:
    settings = _settings(tmp_path, s3, proxy.url)
    async with (
        App(settings, compute=FakeComputeBackend()) as app,
        SartiqClient(f"127.0.0.1:{app.port}") as client,
    ):
        await client.generations.GetCapabilities(GetCapabilitiesRequest())  # connects
        small = noise_png(40)
        chunks = [small[i : i + 1024] for i in range(0, len(small), 1024)]
        rng = random.Random(16)
        slots = asyncio.Semaphore(32)

        async def cancelled(sent: int) -> None:
            async with slots:
                call = client.artifacts.UploadArtifact()  # type: ignore[call-arg]  # write() API
                await call.write(pb.UploadArtifactRequest(header=pb.UploadArtifactHeader()))
                for chunk in chunks[:sent]:
                    await call.write(pb.UploadArtifactRequest(chunk=chunk))
                call.cancel()

        await asyncio.gather(*(cancelled(rng.randint(0, len(chunks))) for _ in range(100)))

        # A large upload cut while its parts are on their way to the bucket.
        large = noise_png(1500)
        proxy.faults.append(Fault("slow", "PUT", f"/{s3.name}/", seconds=0.3, times=None))
        call = client.artifacts.UploadArtifact()  # type: ignore[call-arg]  # write() API
        await call.write(pb.UploadArtifactRequest(header=pb.UploadArtifactHeader()))
        for start in range(0, len(large), 1024 * 1024):
            await call.write(pb.UploadArtifactRequest(chunk=large[start : start + 1024 * 1024]))
        await call.done_writing()

        async def sending_parts() -> bool:
            return any("partNumber=" in path for _, path in proxy.requests)

        await assert_eventually(sending_parts, timeout=30)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        proxy.faults.clear()

        async def nothing_left() -> bool:
            left = [*await s3.open_uploads(), *await s3.keys(), *await _local_files(tmp_path)]
            return not left

        await assert_eventually(nothing_left, timeout=30)
        assert ("DELETE", f"/{s3.name}/{s3.key(hashlib.sha256(large).hexdigest())}") in {
            (m, p.split("?", 1)[0]) for m, p in proxy.requests
        }
        # And the bucket still takes uploads.
        assert (await client.upload(noise_png(24))).size_bytes > 0


def _assert_unavailable(error: grpc.aio.AioRpcError) -> None:
    """UNAVAILABLE for the storage, with a delay to retry after, and no S3 detail."""
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(error).reason == "STORAGE_UNAVAILABLE"
    assert "503" not in (error.details() or "")  # the detail stays in the log
    delays = []
    for detail in rich_status(error).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delays.append(info.retry_delay.ToTimedelta().total_seconds())
    assert delays == [1.0]


async def _upload_messages(data: bytes) -> AsyncIterator[pb.UploadArtifactRequest]:
    yield pb.UploadArtifactRequest(header=pb.UploadArtifactHeader(size_bytes=len(data)))
    yield pb.UploadArtifactRequest(chunk=data)


async def test_a_bucket_out_of_service_is_unavailable_then_serves_again(
    tmp_path: Path, s3: S3Bucket, proxy: FaultProxy
) -> None:
    async with (
        App(_settings(tmp_path, s3, proxy.url), compute=FakeComputeBackend()) as app,
        SartiqClient(f"127.0.0.1:{app.port}") as client,
    ):
        data = png_bytes((10, 20, 30))
        uploaded = await client.upload(data)
        out_of_service = [
            Fault.error(503, method, f"/{s3.name}/", times=None) for method in ("GET", "PUT")
        ]
        proxy.faults.extend(out_of_service)
        request = pb.DownloadArtifactRequest(sha256=uploaded.sha256)
        with pytest.raises(grpc.aio.AioRpcError) as download:
            await client.artifacts.DownloadArtifact(request).read()
        _assert_unavailable(download.value)
        with pytest.raises(grpc.aio.AioRpcError) as upload:  # a new image: for the bucket
            await client.artifacts.UploadArtifact(_upload_messages(png_bytes((40, 50, 60))))
        _assert_unavailable(upload.value)
        inline = catalog_service_pb2.ImageInput(data=png_bytes((70, 80, 90)))
        product = catalog_service_pb2.CreateProductRequest(name="p", reference_images=[inline])
        with pytest.raises(grpc.aio.AioRpcError) as entity:  # its inline image, likewise
            await client.catalog.CreateProduct(product)
        _assert_unavailable(entity.value)
        proxy.faults.clear()
        back = tmp_path / "back.png"
        await client.download(uploaded.sha256, back)
        assert await asyncio.to_thread(back.read_bytes) == data
        assert (await client.upload(png_bytes((40, 50, 60)))).size_bytes > 0
    assert await s3.open_uploads() == []
    assert await _local_files(tmp_path) == []


async def test_an_output_the_bucket_refused_for_a_while_is_stored_on_a_retry(
    tmp_path: Path, s3: S3Bucket, proxy: FaultProxy
) -> None:
    async with (
        App(_settings(tmp_path, s3, proxy.url), compute=FakeComputeBackend()) as app,
        SartiqClient(f"127.0.0.1:{app.port}") as client,
    ):
        product = await client.create_entity("product", "p", images=[png_bytes((9, 9, 9))])
        # The first store of the output fails through the client's own three tries.
        proxy.faults.append(Fault.error(503, "PUT", f"/{s3.name}/", times=4))
        created = await client.generate(
            product_id=product.id, shot_type_string="front", width=64, height=64
        )
        done = await wait_terminal(client.generations, created.id, timeout=60)
        assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED, done.error.message
        assert [kind for _, kind in proxy.injected].count("error") == 4
        assert s3.key(done.predictions[0].artifact.sha256) in await s3.keys()


async def test_a_fetched_input_the_bucket_refuses_fails_its_task_with_the_cause(
    tmp_path: Path, s3: S3Bucket, proxy: FaultProxy
) -> None:
    settings = _settings(tmp_path, s3, proxy.url)
    source = tmp_path / "inputs" / "in.png"
    await asyncio.to_thread(source.write_bytes, png_bytes((1, 2, 3)))
    async with (
        App(settings, compute=FakeComputeBackend()) as app,
        SartiqClient(f"127.0.0.1:{app.port}") as client,
    ):
        proxy.faults.append(Fault.error(503, "PUT", f"/{s3.name}/", times=None))
        created = await client.create(
            resources_pb2.ImageAdjustingParams(base_image_url=source.as_uri(), brightness=0.1)
        )
        done = await wait_terminal(client.generations, created.id, timeout=60)
    assert done.status == enums_pb2.GENERATION_STATUS_FAILED
    error = done.predictions[0].error
    assert error.reason == "INPUT_UNAVAILABLE"
    assert error.metadata["cause"] == "storage_unavailable"


async def test_an_input_the_bucket_fails_to_give_is_inlined_on_a_retry(
    tmp_path: Path, s3: S3Bucket, proxy: FaultProxy, compute_server: str
) -> None:
    settings = _settings(
        tmp_path, s3, proxy.url, backend="http", url=compute_server, token=COMPUTE_TOKEN
    )
    async with App(settings) as app, SartiqClient(f"127.0.0.1:{app.port}") as client:
        sha = (await client.upload(png_bytes((5, 6, 7)))).sha256
        # The first read for the submit fails through the client's three tries.
        proxy.faults.append(Fault.error(503, "GET", f"/{s3.name}/", times=3))
        created = await client.create(
            resources_pb2.ImageAdjustingParams(base_image_url=f"artifact:{sha}", brightness=0.1)
        )
        done = await wait_terminal(client.generations, created.id, timeout=60)
        assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED, done.error.message
        assert [kind for _, kind in proxy.injected] == ["error"] * 3
