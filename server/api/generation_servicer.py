"""GenerationService: decode, delegate to the domain service, encode. Nothing else."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

import grpc

from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2_grpc as pb_grpc
from server.api import convert, requests
from server.api.context import current_organization
from server.api.errors import streaming, unary
from server.contract import encode
from server.contract.enums import to_proto
from server.domain.enums import GenerationType, Strategy, TaskType
from server.orchestration.service import Capabilities, GenerationService
from server.orchestration.watch import Watcher

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name

# The create RPC of each strategy, by method name.
CREATE_METHODS = {
    Strategy.GENERATE: "CreateGenerateGeneration",
    Strategy.EDITING: "CreateEditingGeneration",
    Strategy.REFINE: "CreateRefineGeneration",
    Strategy.VIDEO: "CreateVideoGeneration",
    Strategy.BACKGROUND_FIXING: "CreateBackgroundFixingGeneration",
    Strategy.IMAGE_ADJUSTING: "CreateImageAdjustingGeneration",
    Strategy.FACE_FIXING: "CreateFaceFixingGeneration",
}


def _create_rpc(strategy: Strategy, response: type[Any], decode: Callable[[Any], Any]) -> Any:
    """The create method of one strategy: options and params decoded, the service called."""

    async def create(self: GenerationServicer, request: Any, context: Context) -> Any:
        generation = await self._service.create(
            current_organization(),
            strategy,
            requests.create_options(request),
            decode(request.params),
        )
        return response(generation=encode.generation(generation))

    create.__name__ = CREATE_METHODS[strategy]
    create.__doc__ = f"Create a {strategy.value} generation."
    return unary(create)


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """The gRPC face of the generation service."""

    def __init__(self, service: GenerationService, watcher: Watcher) -> None:
        self._service = service
        self._watcher = watcher

    CreateGenerateGeneration = _create_rpc(
        Strategy.GENERATE, pb.CreateGenerateGenerationResponse, requests.generate_input
    )
    CreateEditingGeneration = _create_rpc(
        Strategy.EDITING, pb.CreateEditingGenerationResponse, requests.editing_input
    )
    CreateRefineGeneration = _create_rpc(
        Strategy.REFINE, pb.CreateRefineGenerationResponse, requests.refine_input
    )
    CreateVideoGeneration = _create_rpc(
        Strategy.VIDEO, pb.CreateVideoGenerationResponse, requests.video_input
    )
    CreateBackgroundFixingGeneration = _create_rpc(
        Strategy.BACKGROUND_FIXING,
        pb.CreateBackgroundFixingGenerationResponse,
        requests.background_fixing_input,
    )
    CreateImageAdjustingGeneration = _create_rpc(
        Strategy.IMAGE_ADJUSTING,
        pb.CreateImageAdjustingGenerationResponse,
        requests.image_adjusting_input,
    )
    CreateFaceFixingGeneration = _create_rpc(
        Strategy.FACE_FIXING, pb.CreateFaceFixingGenerationResponse, requests.face_fixing_input
    )

    @unary
    async def GetGeneration(
        self, request: pb.GetGenerationRequest, context: Context
    ) -> pb.GetGenerationResponse:
        """Read one generation with its predictions and tasks."""
        generation = await self._service.get(current_organization(), request.generation_id)
        return pb.GetGenerationResponse(generation=encode.generation(generation))

    @unary
    async def ListGenerations(
        self, request: pb.ListGenerationsRequest, context: Context
    ) -> pb.ListGenerationsResponse:
        """List generations, newest first, one page at a time."""
        page = await self._service.list(
            current_organization(),
            requests.generation_filter(request.filter),
            request.page_size,
            request.page_token,
        )
        return pb.ListGenerationsResponse(
            generations=[encode.generation(g) for g in page.items],
            next_page_token=page.next_page_token,
        )

    @unary
    async def CancelGeneration(
        self, request: pb.CancelGenerationRequest, context: Context
    ) -> pb.CancelGenerationResponse:
        """Cancel a generation; a finished one is returned unchanged."""
        generation = await self._service.cancel(current_organization(), request.generation_id)
        return pb.CancelGenerationResponse(generation=encode.generation(generation))

    @streaming
    async def WatchGeneration(
        self, request: pb.WatchGenerationRequest, context: Context
    ) -> AsyncGenerator[pb.WatchGenerationResponse, None]:
        """Stream a generation's events from a cursor until its terminal event."""
        items = self._watcher.watch(
            current_organization(), request.generation_id, request.after_sequence
        )
        async with contextlib.aclosing(items):
            async for item in items:
                yield convert.watch_item(item)

    @streaming
    async def WatchGenerations(
        self, request: pb.WatchGenerationsRequest, context: Context
    ) -> AsyncGenerator[pb.WatchGenerationsResponse, None]:
        """Stream the organization's events that match a filter, from a cursor."""
        flt, after = requests.watch_generations(request)
        items = self._watcher.watch_organization(current_organization(), flt, after)
        async with contextlib.aclosing(items):
            async for item in items:
                yield convert.watch_many_item(item)

    @unary
    async def GetCapabilities(
        self, request: pb.GetCapabilitiesRequest, context: Context
    ) -> pb.GetCapabilitiesResponse:
        """What this server runs now."""
        return capabilities(await self._service.capabilities())


def capabilities(value: Capabilities) -> pb.GetCapabilitiesResponse:
    """The GetCapabilities response for the service's capabilities."""
    strategies = []
    for strategy, method in CREATE_METHODS.items():
        offered = value.strategies.get(strategy)
        strategies.append(
            pb.StrategyCapability(
                strategy=to_proto(strategy, Strategy),
                available=offered is not None,
                method=f"/{SERVICE}/{method}",
                task_types=[to_proto(t, TaskType) for t in value.task_types.get(strategy, ())],
                limits=[
                    pb.FieldLimit(
                        field=limit.field,
                        minimum=limit.minimum,
                        maximum=limit.maximum,
                        description=limit.description,
                    )
                    for limit in (offered or ())
                ],
            )
        )
    return pb.GetCapabilitiesResponse(
        strategies=strategies,
        generation_types=[to_proto(t, GenerationType) for t in value.generation_types],
        evaluation_providers=value.evaluation_providers,
        compute_backend=value.compute_backend,
        max_upload_bytes=value.max_upload_bytes,
        max_input_pixels=value.max_input_pixels,
        task_providers=[
            pb.TaskTypeProvider(
                task_type=to_proto(TaskType(name), TaskType),
                provider=served.get("provider", ""),
                model=served.get("model", ""),
                pipeline=served.get("pipeline", ""),
            )
            for name, served in value.task_providers.items()
            if name in TaskType.__members__
        ],
    )
