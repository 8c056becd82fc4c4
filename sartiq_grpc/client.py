"""A small hand-written async client over the generated stubs.

    async with SartiqClient("127.0.0.1:50051", api_key="...") as client:
        image = await client.upload(Path("dress.png").read_bytes())
        product = await client.create_entity("product", "Red dress",
                                             artifacts=[image.sha256])
        generation = await client.generate(product_id=product.id,
                                           shot_type_string="full-body")
        async for event in client.watch(generation.id):
            print(event.sequence, event.kind)
        done = await client.get(generation.id)
        await client.download(done.predictions[0].artifact.sha256, Path("out.png"))

Everything goes over gRPC: uploads and downloads stream bytes, so the client needs no
access to the server's disk.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sartiq_grpc import errors, resume
from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2, catalog_service_pb2_grpc
from sartiq_grpc.sartiq.generation.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    enums_pb2,
    generation_service_pb2,
    generation_service_pb2_grpc,
    resources_pb2,
)

if TYPE_CHECKING:
    from sartiq_grpc.sartiq.catalog.v1.catalog_service_pb2_grpc import CatalogServiceAsyncStub
    from sartiq_grpc.sartiq.generation.v1.artifact_service_pb2_grpc import (
        ArtifactServiceAsyncStub,
    )
    from sartiq_grpc.sartiq.generation.v1.generation_service_pb2_grpc import (
        GenerationServiceAsyncStub,
    )

CHUNK_BYTES = 1024 * 1024
StrategyParams = (
    resources_pb2.GenerateParams
    | resources_pb2.EditingParams
    | resources_pb2.RefineParams
    | resources_pb2.VideoParams
    | resources_pb2.BackgroundFixingParams
    | resources_pb2.ImageAdjustingParams
    | resources_pb2.FaceFixingParams
)
# The create method of each strategy, by the name of its parameter message.
_CREATE_METHODS = {
    "GenerateParams": "CreateGenerateGeneration",
    "EditingParams": "CreateEditingGeneration",
    "RefineParams": "CreateRefineGeneration",
    "VideoParams": "CreateVideoGeneration",
    "BackgroundFixingParams": "CreateBackgroundFixingGeneration",
    "ImageAdjustingParams": "CreateImageAdjustingGeneration",
    "FaceFixingParams": "CreateFaceFixingGeneration",
}
_CATALOG_KINDS = ("subject", "product", "style")
T = TypeVar("T")
# How long the probe that explains a failed connection may take.
_PROBE_SECONDS = 0.5
# Calls go round robin over every address the target resolves to (``dns:///host:port``
# names each replica behind a headless service), and a replica that comes or goes is
# picked up at the next resolution; with one address this is the usual single connection.
# A server's GOAWAY (its max connection age) makes the channel connect again, so calls
# also spread over workers sharing one port (SO_REUSEPORT) as connections age out.
CHANNEL_OPTIONS = (
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
)


async def _checked(call: Awaitable[T]) -> T:
    """Await a call, turning a failure into the client's exception for it."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        raise errors.from_rpc_error(error) from None


def agentic(
    max_attempts: int | None = None,
    min_confidence_score: float | None = None,
    evaluation_provider: str = "",
) -> resources_pb2.Orchestration:
    """An AGENTIC orchestration; what is left unset takes the server's default (3, 0.7, auto)."""
    config = resources_pb2.AgenticConfig(evaluation_provider=evaluation_provider)
    if max_attempts is not None:
        config.max_attempts = max_attempts
    if min_confidence_score is not None:
        config.min_confidence_score = min_confidence_score
    return resources_pb2.Orchestration(type=enums_pb2.GENERATION_TYPE_AGENTIC, agentic=config)


def tls_credentials(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files (the system roots when ``ca_file`` is None).

    ``cert_file`` and ``key_file`` are the client certificate and key for mutual TLS.
    """
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes() if ca_file else None,
        private_key=key_file.read_bytes() if key_file else None,
        certificate_chain=cert_file.read_bytes() if cert_file else None,
    )


class SartiqClient:
    """Generation, artifact and catalog calls over one channel; an async context manager.

    Args:
        target: ``host:port`` of the server, or ``dns:///host:port`` (any gRPC target
            URI); calls are spread round robin over the addresses it resolves to.
        api_key: sent as ``authorization: Bearer <key>``; omit for a development server.
        metadata: extra call metadata for every call.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str = "",
        metadata: Sequence[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """Connect to ``target`` (plaintext, or TLS with ``credentials``).

        For TLS use ``grpc.ssl_channel_credentials(root_certificates=...)``, with
        ``private_key`` and ``certificate_chain`` for a server that requires client
        certificates (mutual TLS); see ``tls_credentials``.
        """
        self._channel = (
            grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        )
        auth = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._metadata = (*auth, *metadata)
        self.generations: GenerationServiceAsyncStub = (
            generation_service_pb2_grpc.GenerationServiceStub(self._channel)
        )
        self.artifacts: ArtifactServiceAsyncStub = artifact_service_pb2_grpc.ArtifactServiceStub(
            self._channel
        )
        self.catalog: CatalogServiceAsyncStub = catalog_service_pb2_grpc.CatalogServiceStub(
            self._channel
        )

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

    async def connect(self, within: float) -> None:
        """Wait until the channel is connected, at most ``within`` seconds.

        Calls connect by themselves; this bounds the wait and says why it failed.

        Raises:
            TransportError: no connection in ``within`` seconds; the message gives the
                transport's reason when it has one (e.g. "Connection refused").
        """
        if self._channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
            return
        try:
            await asyncio.wait_for(self._channel.channel_ready(), within)
        except TimeoutError:
            raise errors.TransportError(await self._why_unconnected()) from None

    async def _why_unconnected(self) -> str:
        """The transport's reason the channel is not connected, from one quick call."""
        try:
            await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(), timeout=_PROBE_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return "no answer"
            # The last clause is the cause: "failed to connect to all addresses; last
            # error: UNKNOWN: ipv4:127.0.0.1:9: Failed to connect to remote host:
            # Connection refused", "errors resolving h:1: [...: Domain name not found]".
            cause = (error.details() or "").rsplit(": ", 1)[-1].strip("[]() ")
            return cause or error.code().name
        return "connected only as the wait ended"

    async def health(self, service: str = "") -> str:
        """The server's ``grpc.health.v1`` status for ``service`` ("" is the server), by name.

        Raises:
            ApiError: the server answered with an error (e.g. NOT_FOUND for an unknown
                service).
        """
        request = health_pb2.HealthCheckRequest(service=service)
        response = await _checked(health_pb2_grpc.HealthStub(self._channel).Check(request))
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return name

    async def upload(self, data: bytes) -> resources_pb2.Artifact:
        """Upload an image in 1 MiB chunks; returns its artifact (use ``artifact:<sha256>``)."""

        async def requests() -> AsyncIterator[artifact_service_pb2.UploadArtifactRequest]:
            header = artifact_service_pb2.UploadArtifactHeader(size_bytes=len(data))
            yield artifact_service_pb2.UploadArtifactRequest(header=header)
            for start in range(0, len(data), CHUNK_BYTES):
                chunk = data[start : start + CHUNK_BYTES]
                yield artifact_service_pb2.UploadArtifactRequest(chunk=chunk)

        response = await _checked(
            self.artifacts.UploadArtifact(requests(), metadata=self._metadata)
        )
        return response.artifact

    async def download(self, sha256: str, destination: Path) -> resources_pb2.Artifact:
        """Download an artifact to ``destination``, resuming a partial file if one is there.

        Bytes already in ``destination`` are kept and the download continues from its
        size, so calling again after a cut connection fetches only the rest.
        """
        # A local file, written as chunks arrive: small blocking writes, as any CLI does.
        with destination.open("ab") as handle:
            offset = handle.tell()
            request = artifact_service_pb2.DownloadArtifactRequest(sha256=sha256, offset=offset)
            artifact = resources_pb2.Artifact()
            try:
                async for item in self.artifacts.DownloadArtifact(request, metadata=self._metadata):
                    if item.HasField("artifact"):
                        artifact = item.artifact
                    handle.write(item.chunk)
            except grpc.aio.AioRpcError as error:
                raise errors.from_rpc_error(error) from None
        return artifact

    async def create_entity(
        self,
        kind: str,
        name: str,
        *,
        description: str = "",
        images: Sequence[bytes] = (),
        artifacts: Sequence[str] = (),
    ) -> Any:
        """Create a subject, product or style from inline images and/or uploaded artifacts."""
        if kind not in _CATALOG_KINDS:
            raise ValueError(f"kind must be one of {_CATALOG_KINDS}")
        request_type = getattr(catalog_service_pb2, f"Create{kind.title()}Request")
        references = [catalog_service_pb2.ImageInput(data=data) for data in images]
        references += [
            catalog_service_pb2.ImageInput(artifact=f"artifact:{sha}") for sha in artifacts
        ]
        request = request_type(name=name, description=description, reference_images=references)
        method = getattr(self.catalog, f"Create{kind.title()}")
        response = await _checked(method(request, metadata=self._metadata))
        return getattr(response, kind)

    async def generate(
        self,
        *,
        request_id: str = "",
        labels: dict[str, str] | None = None,
        orchestration: resources_pb2.Orchestration | None = None,
        **params: Any,
    ) -> resources_pb2.Generation:
        """Start a GENERATE generation (BASE unless ``orchestration`` says) in PENDING."""
        return await self.create(
            resources_pb2.GenerateParams(**params),
            request_id=request_id,
            labels=labels,
            orchestration=orchestration,
        )

    async def create(
        self,
        params: StrategyParams,
        *,
        request_id: str = "",
        labels: dict[str, str] | None = None,
        orchestration: resources_pb2.Orchestration | None = None,
    ) -> resources_pb2.Generation:
        """Start a generation of the strategy ``params`` belong to; returns it in PENDING.

        ``params`` is one of the strategy parameter messages (``GenerateParams``,
        ``EditingParams``, ``RefineParams``, ``VideoParams``, ``BackgroundFixingParams``,
        ``ImageAdjustingParams``, ``FaceFixingParams``).
        """
        method = _CREATE_METHODS[type(params).__name__]
        request_type = getattr(generation_service_pb2, f"{method}Request")
        request = request_type(
            request_id=request_id,
            labels=labels or {},
            orchestration=orchestration,
            params=params,
        )
        call = getattr(self.generations, method)
        response = await _checked(call(request, metadata=self._metadata))
        generation: resources_pb2.Generation = response.generation
        return generation

    async def get(self, generation_id: str) -> resources_pb2.Generation:
        """Read a generation with its predictions and tasks."""
        request = generation_service_pb2.GetGenerationRequest(generation_id=generation_id)
        response = await _checked(self.generations.GetGeneration(request, metadata=self._metadata))
        return response.generation

    async def list(self, page_size: int = 20, page_token: str = "") -> tuple[list[Any], str]:
        """One page of generations, newest first, and the next page's token."""
        request = generation_service_pb2.ListGenerationsRequest(
            page_size=page_size, page_token=page_token
        )
        response = await _checked(
            self.generations.ListGenerations(request, metadata=self._metadata)
        )
        return list(response.generations), response.next_page_token

    async def cancel(self, generation_id: str) -> resources_pb2.Generation:
        """Cancel a generation."""
        request = generation_service_pb2.CancelGenerationRequest(generation_id=generation_id)
        response = await _checked(
            self.generations.CancelGeneration(request, metadata=self._metadata)
        )
        return response.generation

    async def capabilities(self) -> generation_service_pb2.GetCapabilitiesResponse:
        """What the server runs: strategies and their limits, orchestration types, backend."""
        return await _checked(
            self.generations.GetCapabilities(
                generation_service_pb2.GetCapabilitiesRequest(), metadata=self._metadata
            )
        )

    async def watch(
        self,
        generation_id: str,
        after_sequence: int = 0,
        *,
        resume_for: float = 60.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> AsyncIterator[resources_pb2.GenerationEvent]:
        """Yield the generation's events after ``after_sequence`` until its terminal one.

        Heartbeats are skipped. When the server cannot be reached or goes away (it
        restarts, shuts down, the connection is cut, or closed after the server's
        maximum connection age) the watch waits for it and reconnects, to any replica,
        with the last sequence received, so every event arrives exactly once;
        it gives up with ``TransportError`` after ``resume_for`` seconds without
        progress. ``on_wait`` is called with the reason each time it starts waiting.

        Raises:
            ApiError: the server refused the watch (unknown id, bad cursor, ...).
            TransportError: the server stayed unreachable for ``resume_for`` seconds.
        """

        def open_stream(after: int) -> Any:
            request = generation_service_pb2.WatchGenerationRequest(
                generation_id=generation_id, after_sequence=after
            )
            return self.generations.WatchGeneration(request, metadata=self._metadata)

        def position(item: Any) -> int | None:
            return int(item.event.sequence) if item.HasField("event") else None

        resuming = resume.resuming(
            self.connect, open_stream, after_sequence, position, resume_for, on_wait
        )
        async for item in resuming:
            if item.HasField("event"):
                yield item.event
                if item.event.terminal:
                    return

    async def watch_generations(
        self,
        flt: generation_service_pb2.GenerationFilter | None = None,
        after_cursor: int = -1,
        *,
        resume_for: float = 60.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> AsyncIterator[resources_pb2.GenerationEvent]:
        """Yield the events of the organization's generations matching ``flt``, for ever.

        ``after_cursor`` -1 starts from now; pass the last ``event.cursor`` to resume.
        Waits for the server and reconnects by itself like ``watch``, from the last
        cursor seen (heartbeats advance it too).

        Raises:
            ApiError: the server refused the watch (a bad filter, ...).
            TransportError: the server stayed unreachable for ``resume_for`` seconds.
        """

        def open_stream(after: int) -> Any:
            request = generation_service_pb2.WatchGenerationsRequest(filter=flt, after_cursor=after)
            return self.generations.WatchGenerations(request, metadata=self._metadata)

        def position(item: Any) -> int | None:
            if item.HasField("event"):
                return int(item.event.cursor)
            return int(item.heartbeat.cursor) or None

        resuming = resume.resuming(
            self.connect, open_stream, after_cursor, position, resume_for, on_wait
        )
        async for item in resuming:
            if item.HasField("event"):
                yield item.event
