"""Two replicas, no shared directory: an artifact written by one is served by the other.

Both keep their artifacts in one bucket of a real S3-compatible server process (moto's)
and their records in one database: PostgreSQL when configured (both replicas running at
once), else one SQLite file (the replicas take turns, as one process per file allows).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
from conftest import make_settings
from helpers import png_bytes, wait_terminal
from pg import fresh_database, requires_postgres
from procs import ServerProcess
from s3 import S3Bucket
from test_artifacts import noise_png

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import enums_pb2
from server.app import App
from server.config import DatabaseSettings, Settings

Step = Callable[[SartiqClient], Awaitable[None]]


def _replica(tmp_path: Path, name: str, database: str, s3: S3Bucket) -> Settings:
    """One replica's settings: its own directories, the shared database and bucket."""
    base = make_settings(tmp_path / name).model_copy(
        update={"database": DatabaseSettings(url=database)}
    )
    return s3.settings(base, tmp_path / name / "spool")


@asynccontextmanager
async def _replicas(
    tmp_path: Path, s3: S3Bucket, database: str
) -> AsyncIterator[Callable[[str, Step], Awaitable[None]]]:
    """``run(name, step)`` runs ``step`` with a client of replica ``name`` ("a" or "b").

    On PostgreSQL both replicas serve throughout; on SQLite each step starts its replica
    and stops it after, so the two never hold the file at once.
    """
    settings = {name: _replica(tmp_path, name, database, s3) for name in ("a", "b")}
    concurrent = not database.startswith("sqlite")
    async with AsyncExitStack() as stack:
        running: dict[str, App] = {}
        if concurrent:
            for name, replica in settings.items():
                running[name] = await stack.enter_async_context(App(replica))

        async def run(name: str, step: Step) -> None:
            async with AsyncExitStack() as turn:
                app = running[name] if concurrent else None
                if app is None:
                    app = await turn.enter_async_context(App(settings[name]))
                client = await turn.enter_async_context(SartiqClient(f"127.0.0.1:{app.port}"))
                await step(client)

        yield run


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=requires_postgres)])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
        return
    async with fresh_database() as url:
        yield url


async def test_an_artifact_made_on_one_replica_downloads_from_the_other(
    tmp_path: Path, s3: S3Bucket, database: str
) -> None:
    image = noise_png(1500)  # a multipart upload
    seen: dict[str, str] = {}

    async def upload(client: SartiqClient) -> None:
        seen["upload"] = (await client.upload(image)).sha256

    async def generate(client: SartiqClient) -> None:
        # This replica's compute reads the other's upload from the bucket.
        product = await client.create_entity(
            "product", "noise", images=[png_bytes((10, 90, 200))], artifacts=[seen["upload"]]
        )
        created = await client.generate(
            product_id=product.id, shot_type_string="front", width=64, height=64, seed=5
        )
        done = await wait_terminal(client.generations, created.id, timeout=60)
        assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED, done.error.message
        seen["output"] = done.predictions[0].artifact.sha256

    async def download(client: SartiqClient) -> None:
        for what in ("upload", "output"):
            path = tmp_path / f"{what}-{len(seen)}"
            await client.download(seen[what], path)
            data = await asyncio.to_thread(path.read_bytes)
            assert hashlib.sha256(data).hexdigest() == seen[what]
            seen[f"downloaded {what}"] = path.name

    async with _replicas(tmp_path, s3, database) as run:
        await run("a", upload)
        await run("b", generate)
        await run("a", download)
        await run("b", download)
    assert s3.key(seen["output"]) in await s3.keys()
    assert await s3.open_uploads() == []
    for name in ("a", "b"):  # neither replica kept a byte of its own
        spool = tmp_path / name / "spool"
        assert not spool.exists() or not any(spool.iterdir())
        assert not (tmp_path / name / "artifacts").exists()


@requires_postgres
async def test_replica_processes_share_artifacts_through_the_bucket(
    tmp_path: Path, s3: S3Bucket
) -> None:
    """Two ``python -m server`` processes on one PostgreSQL database and one bucket."""
    async with fresh_database() as url:
        replicas = []
        for name in ("a", "b"):
            workdir = tmp_path / name
            workdir.mkdir()
            replicas.append(
                ServerProcess.service(
                    workdir,
                    database__url=url,
                    storage__url=s3.url,
                    storage__s3_endpoint_url=s3.endpoint,
                    storage__spool_dir=str(workdir / "spool"),
                )
            )
        a, b = replicas
        await a.start()  # one at a time: each migrates the database at start
        await b.start()
        try:
            async with (
                SartiqClient(a.target) as on_a,
                SartiqClient(b.target) as on_b,
            ):
                image = noise_png(1500)
                sha = (await on_a.upload(image)).sha256
                product = await on_b.create_entity("product", "noise", artifacts=[sha])
                created = await on_b.generate(
                    product_id=product.id, shot_type_string="front", width=64, height=64, seed=2
                )
                done = await wait_terminal(on_b.generations, created.id, timeout=60)
                assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED, done.error.message
                output = done.predictions[0].artifact.sha256
                for client, digest in ((on_a, output), (on_b, sha), (on_a, sha)):
                    path = tmp_path / f"{digest[:8]}-{id(client)}"
                    await client.download(digest, path)
                    data = await asyncio.to_thread(path.read_bytes)
                    assert hashlib.sha256(data).hexdigest() == digest
        finally:
            assert await a.stop() == 0, a.log_tail()
            assert await b.stop() == 0, b.log_tail()
    for name in ("a", "b"):
        assert not (tmp_path / name / "artifacts").exists()
