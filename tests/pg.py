"""PostgreSQL for tests: a new database per test next to ``SARTIQ_TEST_POSTGRES_URL``.

Without that variable (a laptop without a server) the tests marked ``requires_postgres``
skip and say why; CI sets it (``.ci/run``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from scripts.pgtemp import fresh_database as _fresh

POSTGRES_URL = os.environ.get("SARTIQ_TEST_POSTGRES_URL", "")
requires_postgres = pytest.mark.skipif(
    not POSTGRES_URL, reason="SARTIQ_TEST_POSTGRES_URL is not set; PostgreSQL tests need a server"
)


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """Create an empty database, yield its URL, then drop it (closing its connections)."""
    async with _fresh(POSTGRES_URL) as url:
        yield url
