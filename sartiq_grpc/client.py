"""A small hand-written async client over the generated stubs.

async with SartiqClient("127.0.0.1:50051") as client:
product = await client.create_product("Red dress", images=[png_bytes])
generation = await client.generate(product_id=product.id, shot_type_string="full-body")
async for event in client.watch(generation.id):
print(event.sequence, event.kind)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from sartiq_grpc.sartiq.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from sartiq_grpc.sartiq.generation.v1 import resources_pb2, service_pb2, service_pb2_grpc

if TYPE_CHECKING:
    from sartiq_grpc.sartiq.catalog.v1.catalog_pb2_grpc import CatalogServiceAsyncStub
    from sartiq_grpc.sartiq.generation.v1.service_pb2_grpc import GenerationServiceAsyncStub

_CATALOG_KINDS = ("subject", "product", "style")


class SartiqClient:
    """Generation and catalog calls over one channel; use it as an async context manager."""

    def __init__(self, target: str, *, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._metadata = tuple(metadata)
        self.generations: GenerationServiceAsyncStub = service_pb2_grpc.GenerationServiceStub(
            self._channel
        )
        self.catalog: CatalogServiceAsyncStub = catalog_pb2_grpc.CatalogServiceStub(self._channel)

    async def __aenter__(self) -> SartiqClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(grace=None)

    async def create_entity(
        self, kind: str, name: str, *, description: str = "", images: Sequence[bytes] = ()
    ) -> Any:
        """Create a subject, product or style with inline reference images."""
        if kind not in _CATALOG_KINDS:
            raise ValueError(f"kind must be one of {_CATALOG_KINDS}")
        request_type = getattr(catalog_pb2, f"Create{kind.title()}Request")
        request = request_type(
            name=name,
            description=description,
            reference_images=[catalog_pb2.ImageInput(data=data) for data in images],
        )
        method = getattr(self.catalog, f"Create{kind.title()}")
        response = await method(request, metadata=self._metadata)
        return getattr(response, kind)

    async def generate(
        self, *, request_id: str = "", labels: dict[str, str] | None = None, **params: Any
    ) -> resources_pb2.Generation:
        """Start a GENERATE generation (BASE) and return it in PENDING."""
        request = service_pb2.CreateGenerationRequest(
            request_id=request_id,
            labels=labels or {},
            params=resources_pb2.GenerateParams(**params),
        )
        response = await self.generations.CreateGeneration(request, metadata=self._metadata)
        return response.generation

    async def get(self, generation_id: str) -> resources_pb2.Generation:
        """Read a generation with its predictions and tasks."""
        request = service_pb2.GetGenerationRequest(generation_id=generation_id)
        response = await self.generations.GetGeneration(request, metadata=self._metadata)
        return response.generation

    async def list(self, page_size: int = 20, page_token: str = "") -> tuple[list[Any], str]:
        """One page of generations, newest first, and the next page's token."""
        request = service_pb2.ListGenerationsRequest(page_size=page_size, page_token=page_token)
        response = await self.generations.ListGenerations(request, metadata=self._metadata)
        return list(response.generations), response.next_page_token

    async def cancel(self, generation_id: str) -> resources_pb2.Generation:
        """Cancel a generation."""
        request = service_pb2.CancelGenerationRequest(generation_id=generation_id)
        response = await self.generations.CancelGeneration(request, metadata=self._metadata)
        return response.generation

    async def watch(
        self, generation_id: str, after_sequence: int = 0
    ) -> AsyncIterator[resources_pb2.GenerationEvent]:
        """Yield the generation's events until its terminal one (heartbeats are skipped)."""
        request = service_pb2.WatchGenerationRequest(
            generation_id=generation_id, after_sequence=after_sequence
        )
        async for item in self.generations.WatchGeneration(request, metadata=self._metadata):
            if item.HasField("event"):
                yield item.event
