"""ArtifactService: chunked uploads and resumable downloads, decoded and delegated."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2 as pb
from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2_grpc as pb_grpc
from server.api.context import current_organization
from server.api.errors import streaming, unary
from server.artifacts.service import ArtifactService, UploadHeader
from server.contract import encode
from server.domain.errors import InvalidArgumentError

Context = grpc.aio.ServicerContext[Any, Any]


async def _decode(
    requests: AsyncIterator[pb.UploadArtifactRequest],
) -> tuple[UploadHeader, AsyncGenerator[bytes, None]]:
    """The header of an upload stream and the chunks after it."""
    first = await anext(aiter(requests), None)
    if first is None or first.WhichOneof("part") != "header":
        raise InvalidArgumentError.of("header", "the first message must carry the header")
    header = UploadHeader(size_bytes=first.header.size_bytes, sha256=first.header.sha256)

    async def chunks() -> AsyncGenerator[bytes, None]:
        async for request in requests:
            if request.WhichOneof("part") != "chunk":
                raise InvalidArgumentError.of(
                    "header", "only the first message may carry the header"
                )
            yield request.chunk

    return header, chunks()


class ArtifactServicer(pb_grpc.ArtifactServiceServicer):
    """The gRPC face of artifact storage."""

    def __init__(self, service: ArtifactService) -> None:
        self._service = service

    @unary
    async def UploadArtifact(
        self, request_iterator: AsyncIterator[pb.UploadArtifactRequest], context: Context
    ) -> pb.UploadArtifactResponse:
        """Store a streamed upload."""
        header, chunks = await _decode(request_iterator)
        async with contextlib.aclosing(chunks):
            artifact = await self._service.upload(current_organization(), header, chunks)
        return pb.UploadArtifactResponse(artifact=encode.artifact(artifact))

    @streaming
    async def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, context: Context
    ) -> AsyncGenerator[pb.DownloadArtifactResponse, None]:
        """Stream an artifact's bytes from an offset."""
        artifact, chunks = await self._service.download(
            current_organization(), request.sha256, request.offset
        )
        first = True
        async with contextlib.aclosing(chunks):
            async for offset, chunk in chunks:
                yield pb.DownloadArtifactResponse(
                    artifact=encode.artifact(artifact) if first else None,
                    offset=offset,
                    chunk=chunk,
                )
                first = False
        if first:  # nothing left to send: still tell the client what it asked for
            yield pb.DownloadArtifactResponse(
                artifact=encode.artifact(artifact), offset=request.offset
            )

    @unary
    async def GetArtifact(
        self, request: pb.GetArtifactRequest, context: Context
    ) -> pb.GetArtifactResponse:
        """An artifact's metadata."""
        artifact = await self._service.get(current_organization(), request.sha256)
        return pb.GetArtifactResponse(artifact=encode.artifact(artifact))
