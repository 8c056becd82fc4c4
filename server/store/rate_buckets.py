"""Each organization's call rate as a token bucket row every replica shares (PostgreSQL).

One statement per call takes a token: an upsert on the organization's row that refills
the bucket by the time passed on the database clock (so replicas' clocks do not matter),
takes a token when one is there, and returns the result. The row lock makes concurrent
calls on different replicas take turns, so together they never get more than the rate.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

# The clock is read once per statement (the inserted row's ``refilled_at``, EXCLUDED's
# when the row exists); a statement that read it earlier but got the row lock later
# never moves the bucket back in time (GREATEST).
_REFILLED = (
    "LEAST(CAST(:burst AS DOUBLE PRECISION), bucket.tokens"
    " + GREATEST(EXCLUDED.refilled_at - bucket.refilled_at, 0) * CAST(:rate AS DOUBLE PRECISION))"
)
_TAKE = text(
    f"""
    INSERT INTO rate_buckets AS bucket (organization, tokens, refilled_at, granted)
    VALUES (
        :organization,
        CAST(:burst AS DOUBLE PRECISION) - 1,
        CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION),
        TRUE
    )
    ON CONFLICT (organization) DO UPDATE SET
        tokens = CASE WHEN {_REFILLED} >= 1 THEN {_REFILLED} - 1 ELSE {_REFILLED} END,
        refilled_at = GREATEST(EXCLUDED.refilled_at, bucket.refilled_at),
        granted = {_REFILLED} >= 1
    RETURNING bucket.tokens, bucket.granted
    """
)


class DatabaseTokenBuckets:
    """``rate`` tokens per second up to ``burst`` per organization, kept in the database.

    Args:
        engine: the service's engine on PostgreSQL (a call borrows a pooled connection
            for one statement, outside any transaction).
        rate: tokens added per second.
        burst: tokens a bucket holds at most (a new organization starts full).
    """

    def __init__(self, engine: AsyncEngine, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._rate = rate
        self._burst = burst

    async def take(self, key: str) -> float:
        """Take a token for ``key``: 0.0 when granted, else the seconds until one is due."""
        params = {"organization": key, "rate": self._rate, "burst": float(self._burst)}
        async with self._engine.connect() as connection:
            row = (await connection.execute(_TAKE, params)).one()
        if row.granted:
            return 0.0
        return (1 - float(row.tokens)) / self._rate
