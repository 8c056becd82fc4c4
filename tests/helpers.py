"""Test helpers: waiting on conditions with a deadline, and reading rich error details."""

from __future__ import annotations

import asyncio
import gc
import io
import time
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import imageio_ffmpeg
import numpy as np
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from google.rpc import error_details_pb2, status_pb2
from PIL import Image, ImageDraw
from sqlalchemy.engine import Connection

from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2, catalog_service_pb2_grpc
from sartiq_grpc.sartiq.generation.v1 import (
    enums_pb2,
    generation_service_pb2,
    generation_service_pb2_grpc,
    resources_pb2,
)
from server.compute.fake import FakeComputeBackend
from server.store.models import Base

if TYPE_CHECKING:
    # The async stub types exist only in the generated .pyi files.
    from sartiq_grpc.sartiq.catalog.v1.catalog_service_pb2_grpc import (
        CatalogServiceAsyncStub as CatalogStub,
    )
    from sartiq_grpc.sartiq.generation.v1.generation_service_pb2_grpc import (
        GenerationServiceAsyncStub as GenerationStub,
    )
else:
    CatalogStub = catalog_service_pb2_grpc.CatalogServiceStub
    GenerationStub = generation_service_pb2_grpc.GenerationServiceStub

__all__ = [
    "TERMINAL",
    "CatalogStub",
    "GenerationStub",
    "assert_eventually",
    "create_generation",
    "create_product",
    "error_info",
    "field_violations",
    "generate_request",
    "png_bytes",
    "rich_status",
    "schema_diff",
    "wait_submitted",
    "wait_terminal",
    "watch_all",
]

TERMINAL = {
    enums_pb2.GENERATION_STATUS_COMPLETED,
    enums_pb2.GENERATION_STATUS_PARTIALLY_COMPLETED,
    enums_pb2.GENERATION_STATUS_FAILED,
    enums_pb2.GENERATION_STATUS_CANCELLED,
}


async def assert_eventually(
    condition: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll ``condition`` until it holds; fail when ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def wait_terminal(
    stub: GenerationStub,
    generation_id: str,
    timeout: float = 30.0,
    metadata: tuple[tuple[str, str], ...] = (),
) -> resources_pb2.Generation:
    """Poll GetGeneration until the generation is done, and return it."""
    latest: list[resources_pb2.Generation] = []

    async def done() -> bool:
        response = await stub.GetGeneration(
            generation_service_pb2.GetGenerationRequest(generation_id=generation_id),
            metadata=metadata,
        )
        latest[:] = [response.generation]
        return response.generation.done

    await assert_eventually(done, timeout)
    return latest[0]


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status a failed call carried in its trailers."""
    metadata: Any = error.trailing_metadata() or ()
    for key, value in metadata:
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no rich status in the trailers")


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The BadRequest field violations of an INVALID_ARGUMENT error, by field."""
    for detail in rich_status(error).details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    raise AssertionError("no BadRequest detail")


def error_info(error: grpc.aio.AioRpcError) -> Any:
    """The ErrorInfo detail of a failed call."""
    for detail in rich_status(error).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")


def generate_request(
    product_id: str, batch: int = 1
) -> generation_service_pb2.CreateGenerateGenerationRequest:
    """A small valid GENERATE request for one product."""
    return generation_service_pb2.CreateGenerateGenerationRequest(
        params=resources_pb2.GenerateParams(
            product_id=product_id,
            shot_type_string="front",
            batch_size=batch,
            width=64,
            height=64,
        )
    )


async def create_generation(stub: GenerationStub, product_id: str, batch: int = 1) -> str:
    """Create a small GENERATE generation and return its id."""
    return (await stub.CreateGenerateGeneration(generate_request(product_id, batch))).generation.id


def schema_diff(connection: Connection) -> list[Any]:
    """Differences between the connected database's schema and the models."""
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


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


async def create_product(
    catalog: CatalogStub,
    name: str = "product",
    *,
    description: str = "",
    colour: tuple[int, int, int] = (200, 20, 30),
    metadata: tuple[tuple[str, str], ...] = (),
) -> str:
    """Create a product with one real reference image and return its id."""
    response = await catalog.CreateProduct(
        catalog_service_pb2.CreateProductRequest(
            name=name,
            description=description,
            reference_images=[catalog_service_pb2.ImageInput(data=png_bytes(colour))],
        ),
        metadata=metadata,
    )
    return response.product.id


async def wait_submitted(fake: FakeComputeBackend, count: int) -> None:
    """Wait until the fake compute backend has accepted ``count`` tasks."""

    async def enough() -> bool:
        return len(fake.tasks) >= count

    await assert_eventually(enough)


async def watch_all(
    stub: GenerationStub, generation_id: str, after: int = 0
) -> list[resources_pb2.GenerationEvent]:
    """Every event of a generation after ``after``, to the stream's end."""
    call = stub.WatchGeneration(
        generation_service_pb2.WatchGenerationRequest(
            generation_id=generation_id, after_sequence=after
        )
    )
    return [item.event async for item in call if item.HasField("event")]


def read_mp4(data: bytes, tmp_path: Path) -> tuple[dict[str, Any], list[np.ndarray[Any, Any]]]:
    """Decode an MP4 with the bundled ffmpeg: its metadata and every frame as int16 HxWx3."""
    path = tmp_path / "read.mp4"
    path.write_bytes(data)
    # read_frames leaves ffmpeg's pipes to the garbage collector once ffmpeg has exited by
    # itself (imageio-ffmpeg 0.6-0.8); that ResourceWarning is not about the code under test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        reader = imageio_ffmpeg.read_frames(str(path))
        meta: dict[str, Any] = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(f, np.uint8).reshape(h, w, 3).astype(np.int16) for f in reader]
        del reader
        gc.collect()
    return meta, frames
