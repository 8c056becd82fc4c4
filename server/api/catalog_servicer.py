"""CatalogService: subjects, products and styles share one implementation per verb."""

from __future__ import annotations

from typing import Any

import grpc

from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2 as pb
from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2_grpc
from server.api.context import current_organization
from server.api.errors import unary
from server.catalog.service import CatalogService, EntityInput, ImageInput, LoraInput
from server.contract.encode import timestamp
from server.domain.enums import CatalogKind
from server.domain.model import CatalogEntity

Context = grpc.aio.ServicerContext[Any, Any]

_MESSAGES: dict[CatalogKind, type[Any]] = {
    CatalogKind.SUBJECT: pb.Subject,
    CatalogKind.PRODUCT: pb.Product,
    CatalogKind.STYLE: pb.Style,
}


def _entity_input(request: Any) -> EntityInput:
    images = [
        ImageInput(data=image.data)
        if image.WhichOneof("source") == "data"
        else ImageInput(artifact=image.artifact)
        for image in request.reference_images
    ]
    lora = None
    if request.HasField("lora"):
        lora = LoraInput(
            uri=request.lora.uri,
            default_weight=(
                request.lora.default_weight if request.lora.HasField("default_weight") else None
            ),
        )
    return EntityInput(
        name=request.name,
        description=request.description,
        reference_images=images,
        lora=lora,
    )


def _entity(entity: CatalogEntity) -> Any:
    lora = None
    if entity.lora_uri:  # unset when the entity has none
        lora = pb.Lora(uri=entity.lora_uri)
        if entity.lora_default_weight is not None:
            lora.default_weight = entity.lora_default_weight
    return _MESSAGES[CatalogKind(entity.kind)](
        id=entity.id,
        name=entity.name,
        description=entity.description,
        reference_images=[
            pb.ReferenceImage(
                sha256=ref.sha256,
                mime_type=ref.mime_type,
                width=ref.width,
                height=ref.height,
                uri=ref.uri,
            )
            for ref in entity.reference_images
        ],
        lora=lora,
        create_time=timestamp(entity.created_at),
        organization=entity.organization,
    )


class CatalogServicer(catalog_service_pb2_grpc.CatalogServiceServicer):
    """The gRPC face of the catalog."""

    def __init__(self, service: CatalogService) -> None:
        self._service = service

    async def _create(self, kind: CatalogKind, request: Any) -> Any:
        return _entity(
            await self._service.create(current_organization(), kind, _entity_input(request))
        )

    async def _get(self, kind: CatalogKind, entity_id: str) -> Any:
        return _entity(await self._service.get(current_organization(), kind, entity_id))

    async def _list(self, kind: CatalogKind, request: Any) -> tuple[list[Any], str]:
        rows, token = await self._service.list(
            current_organization(), kind, request.page_size, request.page_token
        )
        return [_entity(row) for row in rows], token

    @unary
    async def CreateSubject(
        self, request: pb.CreateSubjectRequest, context: Context
    ) -> pb.CreateSubjectResponse:
        """Create a subject."""
        return pb.CreateSubjectResponse(subject=await self._create(CatalogKind.SUBJECT, request))

    @unary
    async def GetSubject(
        self, request: pb.GetSubjectRequest, context: Context
    ) -> pb.GetSubjectResponse:
        """Read a subject."""
        return pb.GetSubjectResponse(
            subject=await self._get(CatalogKind.SUBJECT, request.subject_id)
        )

    @unary
    async def ListSubjects(
        self, request: pb.ListSubjectsRequest, context: Context
    ) -> pb.ListSubjectsResponse:
        """List subjects, newest first."""
        items, token = await self._list(CatalogKind.SUBJECT, request)
        return pb.ListSubjectsResponse(subjects=items, next_page_token=token)

    @unary
    async def DeleteSubject(
        self, request: pb.DeleteSubjectRequest, context: Context
    ) -> pb.DeleteSubjectResponse:
        """Delete a subject."""
        await self._service.delete(current_organization(), CatalogKind.SUBJECT, request.subject_id)
        return pb.DeleteSubjectResponse()

    @unary
    async def CreateProduct(
        self, request: pb.CreateProductRequest, context: Context
    ) -> pb.CreateProductResponse:
        """Create a product."""
        return pb.CreateProductResponse(product=await self._create(CatalogKind.PRODUCT, request))

    @unary
    async def GetProduct(
        self, request: pb.GetProductRequest, context: Context
    ) -> pb.GetProductResponse:
        """Read a product."""
        return pb.GetProductResponse(
            product=await self._get(CatalogKind.PRODUCT, request.product_id)
        )

    @unary
    async def ListProducts(
        self, request: pb.ListProductsRequest, context: Context
    ) -> pb.ListProductsResponse:
        """List products, newest first."""
        items, token = await self._list(CatalogKind.PRODUCT, request)
        return pb.ListProductsResponse(products=items, next_page_token=token)

    @unary
    async def DeleteProduct(
        self, request: pb.DeleteProductRequest, context: Context
    ) -> pb.DeleteProductResponse:
        """Delete a product."""
        await self._service.delete(current_organization(), CatalogKind.PRODUCT, request.product_id)
        return pb.DeleteProductResponse()

    @unary
    async def CreateStyle(
        self, request: pb.CreateStyleRequest, context: Context
    ) -> pb.CreateStyleResponse:
        """Create a style."""
        return pb.CreateStyleResponse(style=await self._create(CatalogKind.STYLE, request))

    @unary
    async def GetStyle(self, request: pb.GetStyleRequest, context: Context) -> pb.GetStyleResponse:
        """Read a style."""
        return pb.GetStyleResponse(style=await self._get(CatalogKind.STYLE, request.style_id))

    @unary
    async def ListStyles(
        self, request: pb.ListStylesRequest, context: Context
    ) -> pb.ListStylesResponse:
        """List styles, newest first."""
        items, token = await self._list(CatalogKind.STYLE, request)
        return pb.ListStylesResponse(styles=items, next_page_token=token)

    @unary
    async def DeleteStyle(
        self, request: pb.DeleteStyleRequest, context: Context
    ) -> pb.DeleteStyleResponse:
        """Delete a style."""
        await self._service.delete(current_organization(), CatalogKind.STYLE, request.style_id)
        return pb.DeleteStyleResponse()
