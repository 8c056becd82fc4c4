"""The compute server's settings: ``SARTIQ_COMPUTE_SERVER__*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ComputeServerSettings(BaseSettings):
    """Where it listens, who may call it, and how much work it takes."""

    model_config = SettingsConfigDict(
        env_prefix="SARTIQ_COMPUTE_SERVER__", frozen=True, extra="forbid"
    )

    host: str = "127.0.0.1"
    port: int = Field(default=8700, ge=0, le=65535)
    token: str = Field(default="", description="bearer token callers must send; empty: none")
    workers: int = Field(default=2, ge=1, le=64)
    max_waiting: int = Field(default=256, ge=1, description="beyond it submits answer 429")
    retain_finished: int = Field(default=1024, ge=1)
    max_input_bytes: int = Field(default=32 * 1024 * 1024, ge=1)
    max_input_pixels: int = Field(default=40_000_000, ge=1)
    port_file: Path | None = None
    log_level: str = "INFO"
