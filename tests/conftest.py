"""Shared fixtures: a real server on port 0 over a real SQLite file, reached by real stubs."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import CatalogStub, GenerationStub
from PIL import Image, ImageDraw

from sartiq_grpc.sartiq.catalog.v1 import catalog_pb2
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
        media=MediaSettings(artifact_dir=tmp_path / "artifacts"),
        orchestration=OrchestrationSettings(progress_interval=0.0),
    )


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (96, 128)) -> bytes:
    """A real PNG: a coloured figure on a white background."""
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w * 0.3, h * 0.05, w * 0.7, h * 0.3), fill=colour)
    draw.rectangle((w * 0.25, h * 0.3, w * 0.75, h * 0.95), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


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
    response = await catalog.CreateProduct(
        catalog_pb2.CreateProductRequest(
            name="Red dress",
            description="a red silk dress",
            reference_images=[catalog_pb2.ImageInput(data=png_bytes((200, 20, 30)))],
        )
    )
    return response.product.id


@pytest.fixture
async def subject_id(catalog: CatalogStub) -> str:
    response = await catalog.CreateSubject(
        catalog_pb2.CreateSubjectRequest(
            name="Ana",
            description="a tall model",
            reference_images=[catalog_pb2.ImageInput(data=png_bytes((90, 60, 40)))],
        )
    )
    return response.subject.id
