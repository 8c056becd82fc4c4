"""Typed settings, read once from ``SARTIQ_*`` environment variables by the composition root.

Nested groups use a double underscore: ``SARTIQ_DATABASE__URL``, ``SARTIQ_SERVER__PORT``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(BaseModel):
    """The gRPC listener."""

    model_config = _FROZEN

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    grace_period: float = Field(default=10.0, ge=0, description="seconds to drain on shutdown")
    max_message_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    heartbeat_interval: float = Field(
        default=15.0, gt=0, description="seconds between Watch heartbeats on an idle stream"
    )
    keepalive_interval: float = Field(
        default=30.0, ge=1, description="seconds between HTTP/2 keepalive pings to clients"
    )
    watch_buffer: int = Field(
        default=256,
        ge=1,
        description="live events buffered per watcher before it resumes from the store",
    )
    default_organization: str = Field(
        default="default", description="tenant of every call in development mode (no API keys)"
    )
    port_file: Path | None = Field(
        default=None,
        description="where to write the bound port once serving (for port 0 and supervisors)",
    )
    rate_limit: float = Field(
        default=0.0,
        ge=0,
        description="calls per second one organization may make (a token bucket); 0: no limit",
    )
    rate_burst: int = Field(default=100, ge=1, description="calls a bucket holds at most")
    tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate chain; with tls_key_file, serve TLS only"
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key")
    tls_client_ca_file: Path | None = Field(
        default=None, description="PEM CA bundle: clients must present a certificate it signed"
    )
    page_token_secret: SecretStr | None = Field(
        default=None,
        min_length=16,
        description="signs page tokens; unset: a random secret kept in the database, created "
        "by the first server to start, so every replica and restart accepts the others' tokens",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="server processes on one port (SO_REUSEPORT), each a replica; more than "
        "one needs PostgreSQL",
    )
    worker_index: int | None = Field(
        default=None,
        ge=0,
        description="internal: set by the supervisor for each worker process it starts "
        "(0..workers-1), the worker's identity among the replicas",
    )
    replica_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9._:/@-]+$",
        description="this replica's identity in the database, unique among running "
        "replicas; unset: <hostname>:<port>/<worker> (a random suffix when the port is 0). "
        "A replica started under a dead one's name resumes its generations at once",
    )
    worker_restarts: int = Field(
        default=5,
        ge=0,
        description="dead workers restarted within a minute at most; one more death stops "
        "the server with status 1",
    )
    max_connection_age: float = Field(
        default=300.0,
        ge=0,
        description="seconds after which a client connection is asked to reconnect (GOAWAY, "
        "with 10% jitter), so clients spread over new replicas; 0: never",
    )
    max_connection_age_grace: float = Field(
        default=60.0,
        ge=0,
        description="seconds calls on an aged connection may take to finish before it is "
        "closed; watch streams then resume on a new connection",
    )


class ApiKey(BaseModel):
    """One API key and the organization its bearer acts for."""

    model_config = _FROZEN

    organization: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    key: SecretStr = Field(min_length=16)
    scopes: tuple[Literal["read", "write", "admin"], ...] = ("read", "write")


class AuthSettings(BaseModel):
    """Who may call. Without keys the server runs in development mode (one organization)."""

    model_config = _FROZEN

    api_keys: tuple[ApiKey, ...] = ()
    api_keys_file: Path | None = Field(
        default=None, description="a JSON list of {organization, key, scopes}, read at start"
    )
    jwt_keys_file: Path | None = Field(
        default=None,
        description="a JWKS (JSON) or PEM public key file: bearer JWTs signed by it are accepted",
    )
    jwt_issuer: str = Field(default="", description="the required iss claim (empty: any)")
    jwt_audience: str = Field(default="", description="the required aud claim (empty: none)")
    jwt_algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    jwt_leeway: float = Field(default=30.0, ge=0, description="seconds of clock skew allowed")
    open_services: tuple[str, ...] = Field(
        default=("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"),
        description="services callable without credentials",
    )
    allow_unauthenticated: bool = Field(
        default=False,
        description="serve without keys or JWTs on an address other than loopback "
        "(development mode everywhere; never in production)",
    )


class DatabaseSettings(BaseModel):
    """The SQL store."""

    model_config = _FROZEN

    url: str = "sqlite+aiosqlite:///./var/sartiq.db"
    echo: bool = False
    busy_timeout_ms: int = Field(default=5000, ge=0)
    listen_url: str | None = Field(
        default=None,
        description="PostgreSQL: where each replica's one LISTEN connection (wake-ups from "
        "other replicas) goes; set it to the server itself when url goes through a pooler "
        "in transaction mode (PgBouncer), which cannot LISTEN; unset: url",
    )
    listen_probe_interval: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="PostgreSQL: seconds between liveness probes of the LISTEN connection "
        "(a dead one is reconnected; meanwhile watchers see other replicas' events at "
        "their heartbeat)",
    )


class MediaSettings(BaseModel):
    """Artifact storage and input limits."""

    model_config = _FROZEN

    artifact_dir: Path = Path("./var/artifacts")
    max_input_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_input_pixels: int = Field(default=40_000_000, ge=1)
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    stale_temp_after: float = Field(
        default=3600.0,
        ge=0,
        description="seconds after which a temporary artifact file of another host is stale",
    )
    input_roots: tuple[Path, ...] = Field(
        default=(),
        description="directories file:// image references may read from; none: refused",
    )
    allow_private_networks: bool = Field(
        default=False,
        description="let http(s) image references reach loopback, private and link-local hosts",
    )
    fetch_timeout: float = Field(
        default=30.0, gt=0, le=600, description="seconds an http(s) image fetch may take in all"
    )
    max_redirects: int = Field(default=5, ge=0, le=20)
    lora_prefixes: tuple[str, ...] = Field(
        default=(),
        description="where catalog LoRA weights may live (e.g. s3://my-loras/); uploads "
        "(artifact:<sha256>) of the organization are always allowed",
    )


class StorageSettings(BaseModel):
    """Where artifact bytes live: a local directory, or S3-compatible object storage."""

    model_config = _FROZEN

    url: str = Field(
        default="",
        description="file:///a/directory or s3://bucket/prefix; empty: the directory "
        "media.artifact_dir (SARTIQ_MEDIA__ARTIFACT_DIR)",
    )
    s3_endpoint_url: str = Field(
        default="",
        description="an S3-compatible service other than AWS (MinIO, R2, GCS); credentials "
        "and region come the standard AWS way (AWS_* variables, profiles, roles)",
    )
    s3_addressing_style: Literal["auto", "virtual", "path"] = Field(
        default="auto", description="path: for services without virtual-host buckets (MinIO)"
    )
    s3_part_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        le=5 * 1024 * 1024 * 1024,
        description="part size of multipart uploads; smaller blobs go in one PUT",
    )
    spool_dir: Path | None = Field(
        default=None,
        description="where uploads to object storage are received first; unset: the "
        "system's temporary directory",
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if url and not url.startswith(("file://", "s3://")):
            raise ValueError("must be file:///a/directory or s3://bucket/prefix")
        return url


class ComputeSettings(BaseModel):
    """Which compute backend runs the tasks, and how."""

    model_config = _FROZEN

    backend: Literal["local", "http"] = "local"
    local_workers: int = Field(
        default=2, ge=1, le=64, description="worker processes of the local backend"
    )
    local_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="how much lower the local backend's worker processes run than the "
        "server (os.nice), so that on a busy machine the event loop's work comes first",
    )
    local_idle: bool = Field(
        default=True,
        description="run the local backend's worker processes under SCHED_IDLE too (Linux): "
        "they get a CPU only when no other thread of the machine wants one, so the event "
        "loop and the database writer never wait behind a render; false: the niceness alone",
    )
    url: str = Field(
        default="http://127.0.0.1:8700", description="the compute server, when backend is http"
    )
    token: str = Field(default="", description="bearer token for the compute server")
    timeout: float = Field(default=10.0, gt=0, le=600, description="seconds per HTTP call")
    retry_budget: float = Field(
        default=60.0,
        gt=0,
        description="seconds one compute call (submit, status, cancel) may keep retrying "
        "transient errors, backing off; new work waits this long for a backend that is down",
    )
    # Circuit breakers, one per operation (submit, lookup, status, events, download, cancel,
    # evaluation): one opens when, over the last ``breaker_window`` seconds, at least
    # ``breaker_min_calls`` calls were made and ``breaker_failure_rate`` of them failed
    # transiently; it stays open ``breaker_reset`` seconds, then lets one trial call
    # through. Scattered faults (a third of the calls) do not open it; a dead server does.
    breaker_failure_rate: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="share of transient failures in the window that opens an operation's circuit",
    )
    breaker_min_calls: int = Field(
        default=40,
        ge=1,
        description="calls the window must hold before the failure rate can open the circuit",
    )
    breaker_window: float = Field(
        default=30.0, gt=0, le=3600, description="seconds of calls the failure rate is taken over"
    )
    breaker_reset: float = Field(
        default=5.0, gt=0, description="seconds a circuit stays open before a trial call"
    )
    inline_limit: int = Field(
        default=32 * 1024 * 1024, ge=1, description="bytes of inputs sent inline per task"
    )
    push: bool = Field(
        default=True,
        description="follow each task on the compute server's events stream (server-sent "
        "events), polling when it fails; false: poll only",
    )


class OrchestrationSettings(BaseModel):
    """Admission and concurrency limits of the engine."""

    model_config = _FROZEN

    max_tasks_in_flight: int = Field(default=8, ge=1)
    max_queued_generations: int = Field(default=1000, ge=1)
    max_live_per_organization: int = Field(
        default=500,
        ge=1,
        description="generations one organization may have in progress; beyond it creates "
        "answer RESOURCE_EXHAUSTED (reason ORGANIZATION_LIMIT) with RetryInfo",
    )
    max_agentic_tasks: int = Field(
        default=96,
        ge=1,
        description="the most compute tasks one AGENTIC generation may cause "
        "(predictions x max_attempts x tasks per attempt); larger requests are refused",
    )
    retry_after_seconds: float = Field(
        default=2.0, gt=0, description="the mean delay a refused create is told (RetryInfo)"
    )
    retry_after_jitter: float = Field(
        default=0.5,
        ge=0,
        lt=1,
        description="each refusal's delay is drawn from retry_after_seconds x (1 +/- this), "
        "so callers refused together do not all come back at the same moment",
    )
    progress_interval: float = Field(
        default=0.5, ge=0, description="minimum seconds between stored progress events per task"
    )
    lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="how long this process's claim on a live generation holds unless renewed",
    )


class Settings(BaseSettings):
    """All settings of the service."""

    model_config = SettingsConfigDict(
        env_prefix="SARTIQ_", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    database: DatabaseSettings = DatabaseSettings()
    media: MediaSettings = MediaSettings()
    storage: StorageSettings = StorageSettings()
    compute: ComputeSettings = ComputeSettings()
    orchestration: OrchestrationSettings = OrchestrationSettings()
    log_level: str = "INFO"
