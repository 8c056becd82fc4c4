"""The compute server's settings: ``SARTIQ_COMPUTE_SERVER__*`` environment variables.

One settings class for the API servers and the Celery workers of the fleet: both read the
same broker, task records and storage. Nested fields use ``__``
(``SARTIQ_COMPUTE_SERVER__STORAGE__URL``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.config import StorageSettings

DEFAULT_PROCESSORS = "server.compute.processors.tasks:default_registry"


class ComputeServerSettings(BaseSettings):
    """Where it listens, who may call it, how much work it takes, and where the fleet is."""

    model_config = SettingsConfigDict(
        env_prefix="SARTIQ_COMPUTE_SERVER__",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)
    token: str = Field(default="", description="bearer token callers must send; empty: none")
    workers: int = Field(
        default=2, ge=1, le=64, description="embedded mode: processors run at once"
    )
    max_waiting: int = Field(default=256, ge=1, description="beyond it submits answer 429")
    retain_finished: int = Field(default=1024, ge=1, description="embedded mode: tasks kept")
    max_input_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    max_input_pixels: int = Field(default=40_000_000, ge=1)
    port_file: Path | None = None
    log_level: str = "INFO"

    # -- the fleet (distributed mode): chosen by setting a broker -------------------------
    broker_url: str = Field(
        default="",
        description="the Celery broker (redis://... or amqp://...); empty: the embedded "
        "one-process mode",
    )
    records_url: str = Field(
        default="",
        description="the Redis holding task records, the idempotency index and task "
        "events; empty: the broker's URL when it is redis://",
    )
    storage: StorageSettings = Field(
        default_factory=StorageSettings,
        description="where workers write outputs and API servers keep inputs "
        "(file:///shared/dir or s3://bucket/prefix); required in fleet mode",
    )
    namespace: str = Field(
        default="sartiq:compute",
        pattern=r"^[A-Za-z0-9:_-]{1,64}$",
        description="prefix of every Redis key and of the queue names",
    )
    lease_s: float = Field(
        default=30.0, gt=0, le=3600, description="a worker's claim on a task, renewed at a third"
    )
    redeliver_after_s: float = Field(
        default=300.0,
        gt=0,
        description="Redis broker: an unacknowledged task is delivered again after this "
        "long (the visibility timeout); RabbitMQ redelivers when the worker's connection drops",
    )
    retain_finished_s: float = Field(
        default=86_400.0, gt=0, description="fleet mode: how long a finished task's record stays"
    )
    cancel_wait_s: float = Field(
        default=5.0, ge=0, le=60, description="how long a cancel waits for a running task to stop"
    )
    processors: str = Field(
        default=DEFAULT_PROCESSORS,
        description="module:function returning the workers' ProcessorRegistry",
    )
    models: Path | None = Field(
        default=None,
        description="the model registry file (TOML): the task types it lists run on its "
        "diffusion models (the diffusion extra); unset: every task on the CPU processors",
    )

    @model_validator(mode="after")
    def _fleet_is_complete(self) -> ComputeServerSettings:
        if self.broker_url:
            if not self.records_url and not self.broker_url.startswith(("redis://", "rediss://")):
                raise ValueError("records_url (a redis:// URL) is required with this broker")
            if not self.storage.url:
                raise ValueError("storage.url (file:// or s3://) is required in fleet mode")
        return self

    @property
    def redis_url(self) -> str:
        """Where the task records live."""
        return self.records_url or self.broker_url
