"""What only object storage has: failed parts, stale multipart uploads, a bucket out of reach.

A real S3-compatible server process (moto's), with the fault proxy in between.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faultproxy import Fault, FaultProxy
from s3 import AWS_ENV, S3Bucket

from server.config import MediaSettings, StorageSettings
from server.domain.errors import StartupError
from server.logs import configure
from server.media.backends import open_storage
from server.media.s3 import S3ArtifactStorage
from server.media.storage import ArtifactCorruptError, StorageError, StorageUnavailableError

MIB = 1024 * 1024


@pytest.fixture
async def proxy(s3: S3Bucket) -> AsyncIterator[FaultProxy]:
    chosen = FaultProxy(int(s3.endpoint.rsplit(":", 1)[1]))
    await chosen.start()
    yield chosen
    await chosen.close()


@pytest.fixture
async def storage(
    s3: S3Bucket, proxy: FaultProxy, tmp_path: Path
) -> AsyncIterator[S3ArtifactStorage]:
    chosen = s3.storage(tmp_path / "spool", endpoint=proxy.url)
    await chosen.start()
    yield chosen
    await chosen.aclose()


def _bytes(size: int, seed: int = 1) -> bytes:
    return hashlib.shake_256(f"{seed}".encode()).digest(size)


async def test_blobs_are_objects_named_by_their_digest(
    storage: S3ArtifactStorage, s3: S3Bucket, proxy: FaultProxy
) -> None:
    small, large = _bytes(1000), _bytes(11 * MIB, seed=2)
    first = await storage.put(small, "image/png")
    second = await storage.put(large, "video/mp4")
    assert await s3.keys() == sorted([s3.key(first.sha256), s3.key(second.sha256)])
    async with s3.client() as client:
        head = await client.head_object(Bucket=s3.name, Key=s3.key(second.sha256))
    assert (head["ContentLength"], head["ContentType"]) == (len(large), "video/mp4")
    # The small one in one PUT; the large one in three parts of a multipart upload.
    calls = [(m, p.split("?", 1)[-1][:8]) for m, p in proxy.requests if s3.name in p]
    assert calls.count(("PUT", "uploadId")) == 3
    assert calls.count(("POST", "uploads")) == 1


async def test_a_part_that_keeps_failing_aborts_the_upload(
    storage: S3ArtifactStorage, s3: S3Bucket, proxy: FaultProxy
) -> None:
    data = _bytes(11 * MIB, seed=3)
    # Every part after the first fails, through the client's own retries.
    proxy.faults.append(Fault.error(500, "PUT", f"/{s3.name}/", times=None))
    proxy.faults.insert(0, Fault("slow", "PUT", f"/{s3.name}/", seconds=0.0, times=1))
    with pytest.raises(StorageUnavailableError, match="500"):
        await storage.put(data, "video/mp4")
    proxy.faults.clear()
    assert await s3.open_uploads() == []
    assert await s3.keys() == []
    assert "DELETE" in {m for m, _ in proxy.requests}  # the abort


async def test_a_completion_refused_aborts_the_upload(
    storage: S3ArtifactStorage, s3: S3Bucket, proxy: FaultProxy
) -> None:
    proxy.faults.append(Fault.error(400, "POST", f"/{s3.name}/", times=None))
    proxy.faults.insert(0, Fault("slow", "POST", f"/{s3.name}/", seconds=0.0, times=1))  # create
    with pytest.raises(StorageError, match="400") as refused:
        await storage.put(_bytes(6 * MIB, seed=4), "video/mp4")
    assert not isinstance(refused.value, StorageUnavailableError)  # a 4xx is no passing state
    proxy.faults.clear()
    assert await s3.open_uploads() == []
    assert await s3.keys() == []


async def test_what_a_killed_writer_left_is_swept(
    storage: S3ArtifactStorage, s3: S3Bucket, tmp_path: Path
) -> None:
    async with s3.client() as client:
        # A multipart upload its process never finished, and one outside the prefix.
        await client.create_multipart_upload(Bucket=s3.name, Key=s3.key("a" * 64))
        await client.create_multipart_upload(Bucket=s3.name, Key="elsewhere/b")
    spool = tmp_path / "spool"
    spool.mkdir(parents=True, exist_ok=True)
    dead = spool / f".tmp-{socket.gethostname()}-{_dead_pid()}-abcd"
    dead.write_bytes(b"partial")
    alive = spool / f".tmp-{socket.gethostname()}-{os.getpid()}-abcd"
    alive.write_bytes(b"receiving")

    await storage.sweep(max_age=3600)
    assert not dead.exists()
    assert alive.exists()  # its writer is alive and it is fresh
    # moto dates every multipart upload in 2010, so only an age of 0 tells the sweep's
    # choice here: everything of ours older than that, nothing of anyone else's.
    assert await storage.sweep(max_age=0) >= 1
    assert await s3.open_uploads() == ["elsewhere/b"]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


async def test_a_corrupt_object_is_not_read_as_the_artifact(
    storage: S3ArtifactStorage, s3: S3Bucket
) -> None:
    blob = await storage.put(_bytes(2000, seed=5), "image/png")
    async with s3.client() as client:
        await client.put_object(Bucket=s3.name, Key=s3.key(blob.sha256), Body=b"tampered")
    with pytest.raises(ArtifactCorruptError):
        await storage.read(blob.sha256)


async def test_a_missing_bucket_stops_the_start_with_its_name(s3: S3Bucket, tmp_path: Path) -> None:
    missing = S3Bucket(s3.endpoint, "no-such-bucket-here")
    storage = missing.storage(tmp_path)
    try:
        with pytest.raises(StartupError, match=r"s3://no-such-bucket-here/sartiq/artifacts"):
            await storage.start()
    finally:
        await storage.aclose()


async def test_an_unreachable_endpoint_stops_the_start(s3: S3Bucket, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"  # nothing listens there
    storage = s3.storage(tmp_path, endpoint=closed)
    try:
        with pytest.raises(StartupError, match="cannot be reached"):
            await storage.start()
    finally:
        await storage.aclose()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("s3://Bad_Bucket/p", "bucket"),
        ("s3://ok-bucket/a//b", "prefix"),
        ("s3://ok-bucket/a/../b", "prefix"),
        ("s3://key:secret@ok-bucket/p", "credentials"),
        ("file://host/var/a", "no host"),
        ("file://", "absolute"),
    ],
)
def test_bad_storage_urls_stop_the_start(url: str, why: str, tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=why) as caught:
        open_storage(StorageSettings(url=url), MediaSettings(artifact_dir=tmp_path))
    assert "secret" not in str(caught.value)


def test_the_storage_url_chooses_the_storage(tmp_path: Path) -> None:
    media = MediaSettings(artifact_dir=tmp_path / "artifacts")
    default = open_storage(StorageSettings(), media)
    assert default.location == (tmp_path / "artifacts").as_uri()
    chosen = open_storage(StorageSettings(url=(tmp_path / "elsewhere").as_uri()), media)
    assert chosen.location == (tmp_path / "elsewhere").as_uri()
    remote = open_storage(StorageSettings(url="s3://my-bucket/a/b/"), media)
    assert remote.location == "s3://my-bucket/a/b"
    with pytest.raises(ValueError, match="file:///a/directory or s3://bucket/prefix"):
        StorageSettings(url="gs://bucket/prefix")


async def test_debug_logs_of_the_s3_client_hold_no_credential(
    s3: S3Bucket,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Temporary credentials: the session token travels in a header of every request.
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-0123456789abcdef")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure("DEBUG")
    try:
        storage = s3.storage(tmp_path)
        await storage.start()
        try:
            blob = await storage.put(_bytes(100), "image/png")
            await storage.read(blob.sha256)
        finally:
            await storage.aclose()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    logged = capsys.readouterr().err
    assert "X-Amz-Security-Token" in logged  # the client did log its headers
    for secret in ("session-token-0123456789abcdef", AWS_ENV["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in logged
