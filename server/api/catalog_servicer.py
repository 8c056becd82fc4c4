"""CatalogService: subjects, products and styles share one implementation per verb."""

from __future__ import annotations

from typing import Any

import grpc

from sartiq_grpc.sartiq.catalog.v1 import catalog_pb2 as pb
from sartiq_grpc.sartiq.catalog.v1 import catalog_pb2_grpc
from server.api.convert import timestamp
from server.api.errors import unary
from server.catalog.service import CatalogService, EntityInput, ImageInput
from server.domain.enums import CatalogKind
from server.store.models import CatalogEntity

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
        else ImageInput(uri=image.uri)
        for image in request.reference_images
    ]
    lora = request.lora
    return EntityInput(
        name=request.name,
        description=request.description,
        reference_images=images,
        lora_uri=lora.uri,
        lora_default_weight=lora.default_weight if lora.HasField("default_weight") else None,
    )


def _entity(row: CatalogEntity) -> Any:
    lora = pb.Lora(uri=row.lora_uri)
    if row.lora_default_weight is not None:
        lora.default_weight = row.lora_default_weight
    return _MESSAGES[CatalogKind(row.kind)](
        id=row.id,
        name=row.name,
        description=row.description,
        reference_images=[
            pb.ReferenceImage(
                sha256=ref.artifact.sha256,
                mime_type=ref.artifact.mime_type,
                width=ref.artifact.width,
                height=ref.artifact.height,
                uri=ref.artifact.uri,
            )
            for ref in row.reference_images
        ],
        lora=lora,
        create_time=timestamp(row.created_at),
        organization=row.organization,
    )


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    """The gRPC face of the catalog."""

    def __init__(self, service: CatalogService, *, organization: str) -> None:
        self._service = service
        self._organization = organization

    async def _create(self, kind: CatalogKind, request: Any) -> Any:
        return _entity(await self._service.create(self._organization, kind, _entity_input(request)))

    async def _get(self, kind: CatalogKind, entity_id: str) -> Any:
        return _entity(await self._service.get(self._organization, kind, entity_id))

    async def _list(self, kind: CatalogKind, request: Any) -> tuple[list[Any], str]:
        rows, token = await self._service.list(
            self._organization, kind, request.page_size, request.page_token
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
        await self._service.delete(self._organization, CatalogKind.SUBJECT, request.subject_id)
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
        await self._service.delete(self._organization, CatalogKind.PRODUCT, request.product_id)
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
        await self._service.delete(self._organization, CatalogKind.STYLE, request.style_id)
        return pb.DeleteStyleResponse()
