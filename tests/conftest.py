"""Shared fixtures: a real server on port 0 over a real SQLite file, reached by real stubs."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import CatalogStub, GenerationStub, create_product, png_bytes
from procs import ServerProcess
from s3 import S3Bucket, new_bucket, s3_server_process

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import (
    DatabaseSettings,
    MediaSettings,
    OrchestrationSettings,
    ServerSettings,
    Settings,
)


def make_settings(tmp_path: Path, **server: Any) -> Settings:
    """Settings for one test: its own database file and artifact directory, port 0."""
    return Settings(
        server=ServerSettings(port=0, grace_period=1.0, **server),
        database=DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path / 'sartiq.db'}"),
        media=MediaSettings(artifact_dir=tmp_path / "artifacts", lora_prefixes=("s3://loras/",)),
        orchestration=OrchestrationSettings(progress_interval=0.0),
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def fake_compute() -> FakeComputeBackend:
    return FakeComputeBackend()


@pytest.fixture
async def app(settings: Settings, fake_compute: FakeComputeBackend) -> AsyncIterator[App]:
    async with App(settings, compute=fake_compute) as running:
        yield running


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[SartiqClient]:
    """A client of a server with the real local compute and the local evaluator."""
    async with (
        App(make_settings(tmp_path)) as app,
        SartiqClient(f"127.0.0.1:{app.port}") as client,
    ):
        yield client


@pytest.fixture
async def channel(app: App) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> GenerationStub:
    return GenerationStub(channel)


@pytest.fixture
def catalog(channel: grpc.aio.Channel) -> CatalogStub:
    return CatalogStub(channel)


@pytest.fixture
async def product_id(catalog: CatalogStub) -> str:
    return await create_product(catalog, "Red dress", description="a red silk dress")


@pytest.fixture
async def subject_id(catalog: CatalogStub) -> str:
    response = await catalog.CreateSubject(
        catalog_service_pb2.CreateSubjectRequest(
            name="Ana",
            description="a tall model",
            reference_images=[catalog_service_pb2.ImageInput(data=png_bytes((90, 60, 40)))],
        )
    )
    return response.subject.id


COMPUTE_TOKEN = "compute-token-for-tests"


@pytest.fixture(scope="session")
def compute_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The project's compute server as a real process, one for the session; its base URL.

    It takes the bearer token ``COMPUTE_TOKEN``.
    """
    workdir = tmp_path_factory.mktemp("compute-server")
    with ServerProcess.compute_server(workdir, token=COMPUTE_TOKEN).running() as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An S3-compatible server (moto's) as a real process, one for the session; its URL."""
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto is not installed (pip install -e '.[dev]'): no S3 server to test on")
    workdir = tmp_path_factory.mktemp("s3-server")
    with s3_server_process(workdir).running() as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
async def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new bucket for this test; the AWS variables point every client (and child) at it."""
    return await new_bucket(s3_endpoint, monkeypatch)
