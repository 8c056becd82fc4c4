"""GenerationService: decode, delegate to the domain service, encode. Nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from sartiq_grpc.sartiq.generation.v1 import service_pb2, service_pb2_grpc
from server.api import convert
from server.api.errors import streaming, unary
from server.domain.enums import Strategy
from server.domain.errors import UnimplementedError
from server.orchestration.service import GenerationService
from server.orchestration.watch import Watcher

Context = grpc.aio.ServicerContext[Any, Any]


def _not_available(strategy: Strategy) -> Any:
    """A create method for ``strategy`` that answers UNIMPLEMENTED with a clear message."""

    async def create(self: Any, request: Any, context: Context) -> Any:
        raise UnimplementedError(
            f"strategy {strategy.value} is part of the v1 contract but not available yet; "
            "only GENERATE (CreateGeneration) runs today"
        )

    create.__doc__ = f"{strategy.value} is not available yet."
    return unary(create)


class GenerationServicer(service_pb2_grpc.GenerationServiceServicer):
    """The gRPC face of the generation service."""

    def __init__(self, service: GenerationService, watcher: Watcher, *, organization: str) -> None:
        self._service = service
        self._watcher = watcher
        self._organization = organization

    def _org(self, context: Context) -> str:
        # Until authentication lands every caller belongs to the configured organization.
        return self._organization

    @unary
    async def CreateGeneration(
        self, request: service_pb2.CreateGenerationRequest, context: Context
    ) -> service_pb2.CreateGenerationResponse:
        """Create a GENERATE generation."""
        generation = await self._service.create(
            self._org(context),
            Strategy.GENERATE,
            convert.create_options(request),
            convert.generate_input(request.params),
        )
        return service_pb2.CreateGenerationResponse(generation=convert.generation(generation))

    # Strategies that are in the contract but not built yet answer UNIMPLEMENTED.
    CreateEditingGeneration = _not_available(Strategy.EDITING)
    CreateRefineGeneration = _not_available(Strategy.REFINE)
    CreateVideoGeneration = _not_available(Strategy.VIDEO)
    CreateBackgroundFixingGeneration = _not_available(Strategy.BACKGROUND_FIXING)
    CreateImageAdjustingGeneration = _not_available(Strategy.IMAGE_ADJUSTING)
    CreateFaceFixingGeneration = _not_available(Strategy.FACE_FIXING)

    @unary
    async def GetGeneration(
        self, request: service_pb2.GetGenerationRequest, context: Context
    ) -> service_pb2.GetGenerationResponse:
        """Read one generation with its predictions and tasks."""
        generation = await self._service.get(self._org(context), request.generation_id)
        return service_pb2.GetGenerationResponse(generation=convert.generation(generation))

    @unary
    async def ListGenerations(
        self, request: service_pb2.ListGenerationsRequest, context: Context
    ) -> service_pb2.ListGenerationsResponse:
        """List generations, newest first, one page at a time."""
        page = await self._service.list(
            self._org(context),
            convert.generation_filter(request.filter),
            request.page_size,
            request.page_token,
        )
        return service_pb2.ListGenerationsResponse(
            generations=[convert.generation(g, with_tasks=False) for g in page.items],
            next_page_token=page.next_page_token,
        )

    @unary
    async def CancelGeneration(
        self, request: service_pb2.CancelGenerationRequest, context: Context
    ) -> service_pb2.CancelGenerationResponse:
        """Cancel a generation; a finished one is returned unchanged."""
        generation = await self._service.cancel(self._org(context), request.generation_id)
        return service_pb2.CancelGenerationResponse(generation=convert.generation(generation))

    @streaming
    async def WatchGeneration(
        self, request: service_pb2.WatchGenerationRequest, context: Context
    ) -> AsyncGenerator[service_pb2.WatchGenerationResponse, None]:
        """Stream a generation's events from a cursor until its terminal event."""
        items = self._watcher.watch(
            self._org(context), request.generation_id, request.after_sequence
        )
        async with contextlib.aclosing(items):
            async for item in items:
                yield convert.watch_item(item)
