"""PostgreSQL for tests: a new database per test next to ``SARTIQ_TEST_POSTGRES_URL``.

Without that variable (a laptop without a server) the tests marked ``requires_postgres``
skip and say why; CI sets it (``.ci/run``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import pytest

from scripts.pgtemp import fresh_database as _fresh
from server.domain.states import GENERATION_TERMINAL

POSTGRES_URL = os.environ.get("SARTIQ_TEST_POSTGRES_URL", "")
requires_postgres = pytest.mark.skipif(
    not POSTGRES_URL, reason="SARTIQ_TEST_POSTGRES_URL is not set; PostgreSQL tests need a server"
)


@asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """Create an empty database, yield its URL, then drop it (closing its connections)."""
    async with _fresh(POSTGRES_URL) as url:
        yield url


def generation_row(generation_id: str, organization: str, status: str) -> dict[str, Any]:
    """A generation's row as the writer stores it (the claim columns left to their defaults)."""
    now = datetime.now(UTC)
    return {
        "id": generation_id,
        "organization": organization,
        "type": "BASE",
        "strategy": "GENERATE",
        "status": status,
        "request_id": None,
        "fingerprint": "f",
        "params": {},
        "orchestration": {"type": "BASE"},
        "error": None,
        "created_at": now,
        "started_at": None,
        "finished_at": now if status in {s.value for s in GENERATION_TERMINAL} else None,
        "deadline_at": None,
        "event_seq": 0,
        "refinement": None,
        "owner": None,
        "lease_expires_at": None,
    }
