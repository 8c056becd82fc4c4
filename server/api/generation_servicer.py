"""GenerationService: decode, delegate to the domain service, encode. Nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
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

    @unary
    async def CreateEditingGeneration(
        self, request: service_pb2.CreateEditingGenerationRequest, context: Context
    ) -> service_pb2.CreateEditingGenerationResponse:
        """EDITING is not available yet."""
        raise _unavailable(Strategy.EDITING)

    @unary
    async def CreateRefineGeneration(
        self, request: service_pb2.CreateRefineGenerationRequest, context: Context
    ) -> service_pb2.CreateRefineGenerationResponse:
        """REFINE is not available yet."""
        raise _unavailable(Strategy.REFINE)

    @unary
    async def CreateVideoGeneration(
        self, request: service_pb2.CreateVideoGenerationRequest, context: Context
    ) -> service_pb2.CreateVideoGenerationResponse:
        """VIDEO is not available yet."""
        raise _unavailable(Strategy.VIDEO)

    @unary
    async def CreateBackgroundFixingGeneration(
        self, request: service_pb2.CreateBackgroundFixingGenerationRequest, context: Context
    ) -> service_pb2.CreateBackgroundFixingGenerationResponse:
        """BACKGROUND_FIXING is not available yet."""
        raise _unavailable(Strategy.BACKGROUND_FIXING)

    @unary
    async def CreateImageAdjustingGeneration(
        self, request: service_pb2.CreateImageAdjustingGenerationRequest, context: Context
    ) -> service_pb2.CreateImageAdjustingGenerationResponse:
        """IMAGE_ADJUSTING is not available yet."""
        raise _unavailable(Strategy.IMAGE_ADJUSTING)

    @unary
    async def CreateFaceFixingGeneration(
        self, request: service_pb2.CreateFaceFixingGenerationRequest, context: Context
    ) -> service_pb2.CreateFaceFixingGenerationResponse:
        """FACE_FIXING is not available yet."""
        raise _unavailable(Strategy.FACE_FIXING)

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
    ) -> AsyncIterator[service_pb2.WatchGenerationResponse]:
        """Stream a generation's events from a cursor until its terminal event."""
        async for item in self._watcher.watch(
            self._org(context), request.generation_id, request.after_sequence
        ):
            yield convert.watch_item(item)


def _unavailable(strategy: Strategy) -> UnimplementedError:
    return UnimplementedError(
        f"strategy {strategy.value} is part of the v1 contract but not available yet; "
        "only GENERATE (CreateGeneration) runs today"
    )
