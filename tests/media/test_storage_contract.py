"""The ArtifactStorage contract, one suite for every storage: local directory, memory, S3.

The S3 storage talks to a real S3-compatible server process (moto's) through a real
socket, with a fault proxy in between (``tests/faultproxy.py``) so a test can hold a
request while it cancels the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultproxy import Fault, FaultProxy
from helpers import assert_eventually
from s3 import S3Bucket, new_bucket

from server.media.artifacts import FileArtifactStore
from server.media.memory import MemoryArtifactStorage
from server.media.storage import ArtifactNotFoundError, ArtifactStorage, blocking_reader

MIB = 1024 * 1024


@dataclass
class Harness:
    """A storage under test, and how to see what its unfinished uploads left behind."""

    storage: ArtifactStorage
    leftovers: Callable[[], Awaitable[list[str]]]
    proxy: FaultProxy | None = None
    bucket: S3Bucket | None = None


def _files(root: Path) -> Callable[[], Awaitable[list[str]]]:
    async def leftovers() -> list[str]:
        found = await asyncio.to_thread(lambda: list(root.rglob(".tmp-*")) if root.exists() else [])
        return [str(path) for path in found]

    return leftovers


@pytest.fixture(params=["local", "memory", "s3"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    if request.param == "local":
        yield Harness(FileArtifactStore(tmp_path / "artifacts"), _files(tmp_path / "artifacts"))
        return
    if request.param == "memory":
        memory = MemoryArtifactStorage()

        async def staged() -> list[str]:
            return ["staged upload"] * memory.staged

        yield Harness(memory, staged)
        return
    # Not the async ``s3`` fixture: an async fixture cannot ask for another one by name.
    bucket = await new_bucket(
        request.getfixturevalue("s3_endpoint"), request.getfixturevalue("monkeypatch")
    )
    proxy = FaultProxy(int(bucket.endpoint.rsplit(":", 1)[1]))
    await proxy.start()
    storage = bucket.storage(tmp_path / "spool", endpoint=proxy.url)
    spool = _files(tmp_path / "spool")

    async def left() -> list[str]:
        return [*await bucket.open_uploads(), *await spool()]

    await storage.start()
    try:
        yield Harness(storage, left, proxy=proxy, bucket=bucket)
    finally:
        await storage.aclose()
        await proxy.close()


def _bytes(size: int, seed: int = 1) -> bytes:
    return hashlib.shake_256(f"{seed}".encode()).digest(size)


async def _streamed(storage: ArtifactStorage, sha256: str, offset: int, chunk: int) -> list[bytes]:
    return [piece async for piece in storage.stream(sha256, offset, chunk)]


async def test_put_then_read_size_and_stream(harness: Harness) -> None:
    storage = harness.storage
    data = _bytes(3000)
    stored = await storage.put(data, "image/png")
    assert (stored.sha256, stored.size_bytes, stored.existed) == (
        hashlib.sha256(data).hexdigest(),
        3000,
        False,
    )
    assert stored.uri == f"artifacts/{stored.sha256}"
    assert await storage.read(stored.sha256) == data
    assert await storage.size(stored.sha256) == 3000
    again = await storage.put(data, "image/png")
    assert (again.sha256, again.existed) == (stored.sha256, True)
    for offset in (0, 1, 1000, 2999, 3000):
        chunks = await _streamed(storage, stored.sha256, offset, 700)
        assert b"".join(chunks) == data[offset:]
        assert all(len(piece) == 700 for piece in chunks[:-1])


async def test_nothing_is_stored_under_an_unknown_digest(harness: Harness) -> None:
    storage = harness.storage
    unknown = "e" * 64
    assert await storage.size(unknown) is None
    with pytest.raises(ArtifactNotFoundError):
        await storage.read(unknown)
    with pytest.raises(ArtifactNotFoundError):
        await _streamed(storage, unknown, 0, 1024)
    with pytest.raises(ValueError, match="sha256"):
        await storage.size("../" + "e" * 61)


async def test_a_blob_larger_than_a_part_round_trips(harness: Harness) -> None:
    # Over two S3 parts (5 MiB each in these tests): a multipart upload there.
    data = _bytes(11 * MIB, seed=2)
    stored = await harness.storage.put(data, "video/mp4")
    assert await harness.storage.read(stored.sha256) == data
    tail = await _streamed(harness.storage, stored.sha256, 6 * MIB + 3, MIB)
    assert b"".join(tail) == data[6 * MIB + 3 :]
    assert await harness.leftovers() == []


async def _upload(storage: ArtifactStorage, data: bytes, chunk: int = 1000) -> str:
    upload = storage.begin_upload()
    await upload.open()
    for start in range(0, len(data), chunk):
        await upload.write(data[start : start + chunk])
    return await upload.finish()


async def test_an_upload_is_invisible_until_committed(harness: Harness) -> None:
    storage = harness.storage
    data = _bytes(5000, seed=3)
    upload = storage.begin_upload()
    try:
        await upload.open()
        for start in range(0, len(data), 1024):
            await upload.write(data[start : start + 1024])
        assert upload.size_bytes == 5000
        sha256 = await upload.finish()
        assert sha256 == hashlib.sha256(data).hexdigest()
        assert await storage.size(sha256) is None  # received, not stored
        seen = await upload.probe(lambda content: _content_of(content))
        assert seen == data
        blob = await upload.commit("image/png")
    finally:
        await upload.discard()
    assert (blob.sha256, blob.size_bytes, blob.existed) == (sha256, 5000, False)
    assert await storage.read(sha256) == data
    assert await harness.leftovers() == []


def _content_of(content: bytes | Path) -> bytes:
    return content.read_bytes() if isinstance(content, Path) else content


@pytest.mark.parametrize("stage", ["begun", "opened", "written", "finished"])
async def test_a_discarded_upload_leaves_nothing(harness: Harness, stage: str) -> None:
    storage = harness.storage
    data = _bytes(4000, seed=4)
    upload = storage.begin_upload()
    if stage != "begun":
        await upload.open()
    if stage in ("written", "finished"):
        await upload.write(data)
    if stage == "finished":
        await upload.finish()
    await upload.discard()
    await upload.discard()  # idempotent
    assert await harness.leftovers() == []
    assert await storage.size(hashlib.sha256(data).hexdigest()) is None
    if stage == "finished":
        with pytest.raises(ValueError, match="discarded"):
            await upload.commit("image/png")


async def test_uploading_stored_bytes_again_is_the_same_blob(harness: Harness) -> None:
    data = _bytes(2000, seed=5)
    first = await harness.storage.put(data, "image/png")
    upload = harness.storage.begin_upload()
    try:
        await upload.open()
        await upload.write(data)
        await upload.finish()
        again = await upload.commit("image/png")
    finally:
        await upload.discard()
    assert (again.sha256, again.existed) == (first.sha256, True)
    assert await harness.leftovers() == []


async def test_compute_workers_read_inputs_through_it(harness: Harness) -> None:
    stored = await harness.storage.put(_bytes(1500, seed=6), "image/png")
    resolve = blocking_reader(harness.storage, asyncio.get_running_loop())
    assert await asyncio.to_thread(resolve, f"artifact:{stored.sha256}") == _bytes(1500, seed=6)
    with pytest.raises(FileNotFoundError):
        await asyncio.to_thread(resolve, "artifact:" + "d" * 64)
    with pytest.raises(FileNotFoundError):
        await asyncio.to_thread(resolve, "file:///etc/passwd")
    with pytest.raises(RuntimeError, match="off the event loop"):
        resolve(f"artifact:{stored.sha256}")  # on the loop it would wait for itself


async def test_many_uploads_at_once_keep_their_own_bytes(harness: Harness) -> None:
    blobs = [_bytes(3000 + i, seed=100 + i) for i in range(12)]
    digests = await asyncio.gather(*(_commit(harness.storage, data) for data in blobs))
    for data, sha256 in zip(blobs, digests, strict=True):
        assert await harness.storage.read(sha256) == data
    assert await harness.leftovers() == []


async def _commit(storage: ArtifactStorage, data: bytes) -> str:
    upload = storage.begin_upload()
    try:
        await upload.open()
        await upload.write(data)
        await upload.finish()
        return (await upload.commit("image/png")).sha256
    finally:
        await upload.discard()


@pytest.mark.parametrize("moment", range(6))
async def test_a_large_upload_cancelled_at_any_moment_is_whole_or_absent(
    harness: Harness, moment: int
) -> None:
    # S3: HEAD, create, three parts, complete: each request is held in flight in turn
    # and the caller cancelled then. Elsewhere the commit is cancelled after ``moment``
    # turns of the loop.
    data = _bytes(11 * MIB, seed=7)
    sha256 = hashlib.sha256(data).hexdigest()
    upload = harness.storage.begin_upload()
    await upload.open()
    await upload.write(data)
    await upload.finish()
    proxy = harness.proxy
    seen = len(proxy.requests) if proxy is not None else 0
    if proxy is not None:
        proxy.faults.append(Fault("slow", seconds=0.2, times=None))
    committing = asyncio.create_task(upload.commit("video/mp4"))
    if proxy is not None:

        async def in_flight() -> bool:
            return len(proxy.requests) > seen + moment or committing.done()

        await assert_eventually(in_flight, timeout=30)
    else:
        for _ in range(moment):
            await asyncio.sleep(0)
    landed = committing.cancel()  # a local commit may be done before its turn
    assert landed or proxy is None  # on S3 the request ``moment`` is still in flight
    with contextlib.suppress(asyncio.CancelledError):
        await committing
    await upload.discard()  # as the service does in its ``finally``
    if proxy is not None:
        proxy.faults.clear()

    async def settled() -> bool:
        return await harness.leftovers() == []

    await assert_eventually(settled, timeout=30)
    size = await harness.storage.size(sha256)
    assert size in (None, len(data))
    if size is not None:
        assert await harness.storage.read(sha256) == data
