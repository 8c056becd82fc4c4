"""S3-compatible storage for tests: moto's server in its own process, a bucket per test.

The service and the tests reach it with the standard AWS variables (``AWS_ENV``), set by
the ``s3`` fixture for the test and inherited by the server processes it starts.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from procs import TESTS_DIR, ServerProcess

from server.config import Settings, StorageSettings
from server.media.s3 import S3ArtifactStorage

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never look for an instance role
    "AWS_CONFIG_FILE": "/nonexistent/sartiq-tests/config",  # nor at this machine's profiles
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/sartiq-tests/credentials",
}


def s3_server_process(workdir: Path) -> ServerProcess:
    """Moto's S3 server as a process (``tests/s3_server.py``), port written under ``workdir``."""
    port_file = workdir / "s3.port"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SARTIQ_", "AWS_"))}
    env.update(SARTIQ_TEST_S3_PORT_FILE=str(port_file), PYTHONFAULTHANDLER="1")
    argv = [sys.executable, str(TESTS_DIR / "s3_server.py"), str(port_file)]
    return ServerProcess(
        argv, env, workdir, port_variable="SARTIQ_TEST_S3_PORT_FILE", log_name="s3.log"
    )


@dataclass(frozen=True)
class S3Bucket:
    """One test's bucket on the S3 server at ``endpoint``; blobs go under ``prefix``."""

    endpoint: str
    name: str
    prefix: str = "sartiq/artifacts"

    @property
    def url(self) -> str:
        """The ``SARTIQ_STORAGE__URL`` of this bucket and prefix."""
        return f"s3://{self.name}/{self.prefix}"

    def storage_settings(self, spool_dir: Path, endpoint: str = "") -> StorageSettings:
        """Storage settings for this bucket, reached at ``endpoint`` (a proxy) or directly."""
        return StorageSettings(
            url=self.url,
            s3_endpoint_url=endpoint or self.endpoint,
            s3_part_bytes=5 * 1024 * 1024,
            spool_dir=spool_dir,
        )

    def settings(self, base: Settings, spool_dir: Path, endpoint: str = "") -> Settings:
        """``base`` with its artifacts in this bucket."""
        return base.model_copy(update={"storage": self.storage_settings(spool_dir, endpoint)})

    def storage(self, spool_dir: Path, endpoint: str = "") -> S3ArtifactStorage:
        """A storage on this bucket (not started)."""
        return S3ArtifactStorage(
            self.name,
            self.prefix,
            endpoint_url=endpoint or self.endpoint,
            part_bytes=5 * 1024 * 1024,
            spool_dir=spool_dir,
        )

    @asynccontextmanager
    async def client(self) -> AsyncIterator[S3Client]:
        """A client of the server, as a test looking behind the service's back."""
        config = AioConfig(retries={"mode": "standard", "total_max_attempts": 1})
        async with get_session().create_client(
            "s3", endpoint_url=self.endpoint, config=config
        ) as client:
            yield client

    async def create(self) -> None:
        """Create the bucket."""
        async with self.client() as client:
            await client.create_bucket(Bucket=self.name)

    async def keys(self) -> list[str]:
        """Every object key in the bucket."""
        async with self.client() as client:
            answer = await client.list_objects_v2(Bucket=self.name)
        return sorted(item["Key"] for item in answer.get("Contents", []))

    async def open_uploads(self) -> list[str]:
        """The keys of the multipart uploads neither completed nor aborted."""
        async with self.client() as client:
            answer = await client.list_multipart_uploads(Bucket=self.name)
        return sorted(item["Key"] for item in answer.get("Uploads", []))

    def key(self, sha256: str) -> str:
        """Where the service keeps the blob ``sha256``."""
        return f"{self.prefix}/{sha256[:2]}/{sha256}"


async def new_bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A new bucket no other test uses; the AWS variables point every client (and child) at it."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    bucket = S3Bucket(endpoint, f"sartiq-test-{uuid.uuid4().hex[:16]}")
    await bucket.create()
    return bucket
