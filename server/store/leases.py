"""Which replica runs which live generation, on PostgreSQL: claims, renewals, fencing.

Replicas share one database (DESIGN §13). A replica claims live generations that nobody
holds, or whose holder's lease ran out, with ``FOR UPDATE SKIP LOCKED``, so two replicas
claiming at once take different generations and neither waits for the other. Leases run
on the database's clock (naive UTC, like every stored time) and are renewed every third
of their length. Every claim raises the generation's fencing number; this replica keeps
the number of each generation it holds, and the writer commits a change of a generation
only while that number is still the stored one (see ``Writer``), so an owner that was
paused or cut off past its lease commits nothing once another replica has claimed.

A replica's name is its identity in the ``owner`` column. A replica that starts under
the name of a dead one (an orchestrator restarting a crashed process) claims that one's
generations at once instead of waiting for their leases to run out; were the other still
alive, the fencing numbers would stop it. On SIGTERM a replica releases what it holds and
says so on ``COMMANDS``; the other replicas claim at once. A cancel that reaches a replica
which does not run the generation is recorded on the generation for its owner (and sent
on ``COMMANDS`` as a wake-up): the owner checks the record whenever it is woken and at
every renewal.

Generations nobody holds form the deployment's line: a replica with no workflow free
creates new generations into it, and a replica that shuts down releases its own to it.
Replicas with room take from it, the organizations in turn, woken by a notification on
``COMMANDS`` or by one of their own workflows ending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from server.domain.enums import GenerationStatus
from server.domain.states import GENERATION_TERMINAL

log = logging.getLogger(__name__)

COMMANDS = "sartiq_commands"

# Live statuses spelled out (not "NOT IN terminal"), so the status index finds the rows.
_LIVE = "status IN ({})".format(
    ", ".join(f"'{s.value}'" for s in sorted(set(GenerationStatus) - GENERATION_TERMINAL))
)
_NOW = "timezone('UTC', now())"
_UNTIL = f"{_NOW} + make_interval(secs => :lease)"

# Two kinds of claim, one statement. Held generations whose holder's lease ran out (or,
# at a start, held under this replica's name) are all taken. Generations nobody holds
# wait in the deployment's line (created while their replica was full, or released at a
# shutdown): as many are taken as this replica has room for, the organizations in turn
# (each one's oldest first, then each one's second...). Rows another replica is claiming
# right now are skipped, not waited for.
_CLAIM = f"""
WITH orphaned AS (
    SELECT id, 'orphaned' AS kind FROM generations
    WHERE {_LIVE} AND owner IS NOT NULL
      AND (lease_expires_at IS NULL OR lease_expires_at < {_NOW}
           OR (CAST(:predecessor AS BOOLEAN) AND owner = :name))
      AND (CAST(:only AS VARCHAR) IS NULL OR id = :only)
    FOR UPDATE SKIP LOCKED
), line AS (
    SELECT id, row_number() OVER (PARTITION BY organization ORDER BY created_at, id) AS turn
    FROM generations
    WHERE {_LIVE} AND owner IS NULL AND (CAST(:only AS VARCHAR) IS NULL OR id = :only)
), waiting AS (
    SELECT g.id, 'waiting' AS kind FROM generations AS g JOIN line ON line.id = g.id
    ORDER BY line.turn, g.created_at, g.id
    LIMIT :room
    FOR UPDATE OF g SKIP LOCKED
), claimable AS (
    SELECT id, kind FROM orphaned UNION ALL SELECT id, kind FROM waiting
)
UPDATE generations AS g
SET owner = :name, lease_expires_at = {_UNTIL}, fence = g.fence + 1
FROM claimable WHERE g.id = claimable.id
RETURNING g.id, g.fence, g.cancel_requested_at IS NOT NULL AS cancel, g.created_at,
    claimable.kind
"""

# Where a generation stands in the deployment's line (1 = next), in the claims' order.
_POSITION = f"""
WITH line AS (
    SELECT id, created_at,
        row_number() OVER (PARTITION BY organization ORDER BY created_at, id) AS turn
    FROM generations WHERE {_LIVE} AND owner IS NULL
), ranked AS (
    SELECT id, row_number() OVER (ORDER BY turn, created_at, id) AS position FROM line
)
SELECT position FROM ranked WHERE id = :id
"""
# Announced to the other replicas, with its place in the line: one round trip.
_JOIN = f"SELECT pg_notify(:channel, :payload), ({_POSITION}) AS position"

# The live generations this replica still holds (``:ids`` with their ``:fences``),
# locked in id order as the writer locks them; renewed, or released.
_HELD = f"""
WITH held AS (
    SELECT g.id FROM generations AS g
    JOIN unnest(CAST(:ids AS VARCHAR[]), CAST(:fences AS BIGINT[])) AS t(id, fence)
      ON g.id = t.id AND g.fence = t.fence
    WHERE g.{_LIVE}
    ORDER BY g.id
    FOR UPDATE OF g
)
"""
_RENEW = f"""{_HELD}
UPDATE generations AS g SET lease_expires_at = {_UNTIL}
FROM held WHERE g.id = held.id
RETURNING g.id
"""
_RELEASE = f"""{_HELD}
UPDATE generations AS g SET owner = NULL, lease_expires_at = NULL
FROM held WHERE g.id = held.id
RETURNING g.id
"""

# Checked first thing by every write transaction that changes generations it holds.
FENCES = text("SELECT id, fence FROM generations WHERE id = ANY(:ids) ORDER BY id FOR UPDATE")

_REQUEST_CANCEL = f"""
UPDATE generations SET cancel_requested_at = coalesce(cancel_requested_at, {_NOW})
WHERE id = :id AND organization = :organization AND {_LIVE}
RETURNING id
"""

_CANCEL_REQUESTS = f"""
SELECT id FROM generations
WHERE id = ANY(:ids) AND cancel_requested_at IS NOT NULL AND {_LIVE} AND status <> 'CANCELLING'
"""

_NEXT_EXPIRY = f"""
SELECT EXTRACT(EPOCH FROM min(lease_expires_at) - {_NOW})
FROM generations WHERE {_LIVE} AND owner IS DISTINCT FROM :name
"""


class Wakeups:
    """Why the engine's lease keeper should look again before its next round.

    Kinds: ``WAITING`` (a generation joined the deployment's line), ``ROOM`` (a workflow
    here ended), ``CANCEL`` and ``RELEASED`` (sent by other replicas), ``ANY`` (hints may
    have been missed, as after the listening connection was re-established).
    """

    WAITING, ROOM, CANCEL, RELEASED, ANY = "waiting", "room", "cancel", "released", "any"

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._kinds: set[str] = set()

    def notify(self, kind: str) -> None:
        """Wake the keeper (an unknown kind counts as ``ANY``)."""
        self._kinds.add(kind if kind in _KINDS else self.ANY)
        self._event.set()

    async def wait(self, within: float) -> set[str]:
        """The kinds notified since the last call, once there is one or ``within`` s passed.

        An empty set: the time ran out (the keeper's own round).
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._event.wait()
        self._event.clear()
        kinds, self._kinds = self._kinds, set()
        return kinds


_KINDS = frozenset({Wakeups.WAITING, Wakeups.ROOM, Wakeups.CANCEL, Wakeups.RELEASED, Wakeups.ANY})


@dataclass(frozen=True, slots=True)
class Claim:
    """A generation this replica has just claimed."""

    id: str
    cancel_requested: bool  # a cancel was recorded for it: carry it out
    waited: bool = False  # it came from the deployment's line (not from a dead holder)


class LeaseLost(Exception):  # noqa: N818 - the name says what happened
    """Another replica claimed these generations: this one must not write them."""

    def __init__(self, ids: set[str]) -> None:
        super().__init__(f"{len(ids)} generations are held by another replica now")
        self.ids = ids


class Leases:
    """The claims of one replica on a shared PostgreSQL database.

    Args:
        engine: the service's async engine.
        name: this replica's name (unique among running replicas).
        lease_seconds: how long a claim holds unless renewed.
    """

    def __init__(self, engine: AsyncEngine, *, name: str, lease_seconds: float) -> None:
        self._engine = engine
        self.name = name
        self.lease_seconds = lease_seconds
        # The fencing number of every generation this replica holds.
        self.fences: dict[str, int] = {}

    def adopt(self, generation_id: str) -> None:
        """A generation created here: held with the number a new row starts with."""
        self.fences.setdefault(generation_id, 0)

    def forget(self, generation_id: str) -> None:
        """Stop holding the generation (it ended, or another replica runs it)."""
        self.fences.pop(generation_id, None)

    def held(self, generation_id: str) -> int | None:
        """The fencing number this replica holds the generation with, if it does."""
        return self.fences.get(generation_id)

    async def claim(
        self, *, room: int, predecessor: bool = False, only: str | None = None
    ) -> list[Claim]:
        """Claim what other replicas left; the generations claimed, oldest first.

        Every generation whose holder's lease ran out is claimed, and up to ``room`` from
        the deployment's line, organizations in turn. ``predecessor``: also those held
        under this replica's name (a dead process that ran under it). ``only``: just that
        generation, if it is claimable.
        """
        params = {
            "name": self.name,
            "lease": self.lease_seconds,
            "predecessor": predecessor,
            "only": only,
            "room": room,
        }
        async with self._engine.begin() as connection:
            rows = list((await connection.execute(text(_CLAIM), params)).all())
        rows.sort(key=lambda row: (row.created_at, row.id))
        for row in rows:
            self.fences[row.id] = int(row.fence)
        return [Claim(row.id, bool(row.cancel), row.kind == "waiting") for row in rows]

    async def join_line(self, generation_id: str) -> int:
        """Wake the other replicas: the generation joined the deployment's line.

        Returns its place in the line (1 = next; 0 if a replica took it already).
        """
        params = {"channel": COMMANDS, "payload": Wakeups.WAITING, "id": generation_id}
        async with self._engine.begin() as connection:
            position = (await connection.execute(text(_JOIN), params)).one().position
        return int(position or 0)

    async def queue_position(self, generation_id: str) -> int:
        """The generation's place in the deployment's line (1 = next); 0 if not in it."""
        async with self._engine.connect() as connection:
            position = (await connection.execute(text(_POSITION), {"id": generation_id})).scalar()
        return int(position or 0)

    async def renew(self) -> set[str]:
        """Extend every lease this replica holds; the generations it turns out to have lost."""
        if not self.fences:
            return set()
        ids, fences = list(self.fences), list(self.fences.values())
        async with self._engine.begin() as connection:
            result = await connection.execute(
                text(_RENEW), {"ids": ids, "fences": fences, "lease": self.lease_seconds}
            )
            renewed = {row.id for row in result}
        # A generation whose end committed meanwhile was forgotten by the writer: not lost.
        return {
            i
            for i, fence in zip(ids, fences, strict=True)
            if i not in renewed and self.fences.get(i) == fence
        }

    async def still_holds(self, generation_id: str) -> bool:
        """Whether the stored fencing number of the generation is still this replica's."""
        fence = self.fences.get(generation_id)
        if fence is None:
            return False
        async with self._engine.connect() as connection:
            stored = (
                await connection.execute(
                    text("SELECT fence FROM generations WHERE id = :id"), {"id": generation_id}
                )
            ).scalar()
        return stored == fence

    async def release(self) -> int:
        """Let other replicas claim what this one holds, at once; how many were released.

        Never raises: a replica that cannot release leaves its leases to expire.
        """
        if not self.fences:
            return 0
        try:
            async with self._engine.begin() as connection:
                result = await connection.execute(
                    text(_RELEASE),
                    {"ids": list(self.fences), "fences": list(self.fences.values())},
                )
                released = len(result.all())
                await connection.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": COMMANDS, "payload": Wakeups.RELEASED},
                )
        except Exception as exc:
            log.warning("releasing the leases failed (%s); they expire instead", type(exc).__name__)
            return 0
        self.fences.clear()
        return released

    async def request_cancel(self, organization: str, generation_id: str) -> bool:
        """Record a cancel for the generation's owner and wake it; False if it is not live."""
        async with self._engine.begin() as connection:
            recorded = (
                await connection.execute(
                    text(_REQUEST_CANCEL), {"id": generation_id, "organization": organization}
                )
            ).first()
            if recorded is not None:
                await connection.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": COMMANDS, "payload": Wakeups.CANCEL},
                )
        return recorded is not None

    async def cancel_requests(self) -> list[str]:
        """Generations this replica holds that another replica was asked to cancel."""
        if not self.fences:
            return []
        async with self._engine.connect() as connection:
            result = await connection.execute(text(_CANCEL_REQUESTS), {"ids": list(self.fences)})
            return [row.id for row in result]

    async def next_expiry(self) -> float | None:
        """Seconds until the first lease of another replica runs out (None: none is held)."""
        async with self._engine.connect() as connection:
            seconds = (await connection.execute(text(_NEXT_EXPIRY), {"name": self.name})).scalar()
        return None if seconds is None else float(seconds)
