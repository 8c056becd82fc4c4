"""Builds the grpc.aio server: servicers, health, reflection and the interceptor on one port."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2, catalog_service_pb2_grpc
from sartiq_grpc.sartiq.generation.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    generation_service_pb2,
    generation_service_pb2_grpc,
)
from server.api.artifact_servicer import ArtifactServicer
from server.api.auth import Authenticator
from server.api.catalog_servicer import CatalogServicer
from server.api.generation_servicer import GenerationServicer
from server.api.interceptors import CallInterceptor
from server.api.tls import TlsCredentials
from server.artifacts.service import ArtifactService
from server.catalog.service import CatalogService
from server.config import ServerSettings
from server.domain.errors import StartupError
from server.domain.limits import RateLimiter
from server.orchestration.service import GenerationService
from server.orchestration.watch import Watcher

SERVICE_NAMES = (
    generation_service_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name,
    artifact_service_pb2.DESCRIPTOR.services_by_name["ArtifactService"].full_name,
    catalog_service_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name,
)
# Standard services any caller may use without credentials.
OPEN_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME})
# The health entry of the compute backend: NOT_SERVING while its circuit is open.
COMPUTE_HEALTH = "sartiq.compute"


@dataclass
class GrpcServer:
    """The server, its bound port and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer

    async def mark_serving(self) -> None:
        """Report every service, and the server as a whole, as SERVING."""
        for name in ("", *SERVICE_NAMES, COMPUTE_HEALTH):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def set_compute_health(self, *, healthy: bool) -> None:
        """Report the compute backend on the health service ``sartiq.compute``."""
        status = health_pb2.HealthCheckResponse
        await self.health.set(COMPUTE_HEALTH, status.SERVING if healthy else status.NOT_SERVING)

    async def mark_not_serving(self) -> None:
        """Report NOT_SERVING everywhere so balancers stop sending calls; idempotent."""
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, let calls drain for ``grace`` seconds, then stop."""
        await self.mark_not_serving()
        await self.server.stop(grace)


@dataclass(frozen=True)
class Services:
    """The domain services the servicers delegate to."""

    generations: GenerationService
    watcher: Watcher
    artifacts: ArtifactService
    catalog: CatalogService


def build_server(
    settings: ServerSettings,
    services: Services,
    auth: Authenticator,
    *,
    open_services: frozenset[str] = OPEN_SERVICES,
    tls: TlsCredentials | None = None,
    limits: RateLimiter | None = None,
) -> GrpcServer:
    """Create the server and bind its port (0 picks a free one); it is not started.

    ``limits`` grants each organization's calls (``SARTIQ_SERVER__RATE_LIMIT``); None: no
    limit.

    Raises:
        StartupError: the address cannot be bound (e.g. another process listens there).
    """
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_interval * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        # Workers of one server share its port; otherwise a second server would silently
        # share the port with the first, so a single process refuses a port in use.
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ]
    if settings.max_connection_age > 0:
        # GOAWAY after the age (grpc adds jitter), so clients reconnect and spread over
        # the replicas; calls in flight get the grace, then the connection is closed.
        options += [
            ("grpc.max_connection_age_ms", max(1, round(settings.max_connection_age * 1000))),
            ("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace * 1000)),
        ]
    interceptor = CallInterceptor(auth, open_services=open_services, limits=limits)
    server = grpc.aio.server(interceptors=[interceptor], options=options)
    generation_service_pb2_grpc.add_GenerationServiceServicer_to_server(
        GenerationServicer(services.generations, services.watcher), server
    )
    artifact_service_pb2_grpc.add_ArtifactServiceServicer_to_server(
        ArtifactServicer(services.artifacts), server
    )
    catalog_service_pb2_grpc.add_CatalogServiceServicer_to_server(
        CatalogServicer(services.catalog), server
    )
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.credentials())
    except RuntimeError:
        raise StartupError(f"cannot listen on {address}: the address is in use") from None
    return GrpcServer(server, port, health_servicer)
