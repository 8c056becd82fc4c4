"""Live generations counted for the whole deployment, in the transactions that change them.

Replicas on one PostgreSQL database share the admission limits: the queue bound (live
generations of the deployment) and each organization's live cap. The counts are rows
of ``live_counts``, changed by the writer inside the transaction that creates
generations (+1 each) or ends them (-1 each), so they are exactly the stored live
generations whatever retries, restarts or takeovers happen: a transaction that rolls
back takes its counting with it.

A transaction counts in two steps. Before it writes anything, it locks the rows of the
generations it ends that are still live as stored (in id order): a generation counts as
ending once, however often a terminal state is written. Once its rows are written (so a
create whose request_id exists already has failed and counts for nothing), one upsert
adds the creates and endings to the counts (an organization's first create makes its
row) and returns the counts that result. It locks the count rows until commit, in one
order (the deployment row, then organizations by name), and is the last statement
before the commit, so concurrent creates on different replicas cannot both pass the
same check, and the rows every create and ending needs are held as briefly as possible.

When the counts show a create beyond a limit, the writer rolls the transaction back,
answers the refused creates alone, and writes the rest of its batch again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from sqlalchemy import Connection, text

from server.domain.errors import ResourceExhaustedError
from server.domain.limits import RetryDelay, organization_full, queue_full
from server.domain.states import GENERATION_TERMINAL

ORGANIZATION = "organization"
DEPLOYMENT = "deployment"

_TERMINAL = sorted(s.value for s in GENERATION_TERMINAL)

_ENDING = text(
    """
    SELECT organization FROM generations
    WHERE id = ANY(CAST(:ids AS VARCHAR[])) AND status <> ALL(CAST(:terminal AS VARCHAR[]))
    ORDER BY id
    FOR UPDATE
    """
)

_COUNT = text(
    """
    INSERT INTO live_counts AS counts (scope, organization, live)
    SELECT scope, organization, n
    FROM unnest(
        CAST(:scopes AS VARCHAR[]), CAST(:organizations AS VARCHAR[]), CAST(:deltas AS INTEGER[])
    ) AS deltas (scope, organization, n)
    ORDER BY scope, organization
    ON CONFLICT (scope, organization) DO UPDATE SET live = counts.live + EXCLUDED.live
    RETURNING counts.scope, counts.organization, counts.live
    """
)


@dataclass(frozen=True, slots=True)
class LiveLimits:
    """The deployment's admission limits and the delay a refused create is told to wait."""

    per_organization: int
    total: int
    retry_after: RetryDelay


@dataclass(frozen=True, slots=True)
class Tally:
    """What one transaction changes in the counts.

    ``creates`` has one entry per write of the batch: the organization of the
    generation the write creates, or None. ``finishing`` holds the ids of the
    generations the batch writes in a terminal state.
    """

    creates: list[str | None]
    finishing: list[str]

    def __bool__(self) -> bool:
        return bool(self.finishing) or any(org is not None for org in self.creates)


class LimitReached(Exception):  # noqa: N818 - an answer to callers, not a fault
    """Creates the deployment has no room for, by their place in the batch.

    The transaction that found them must roll back: it counted them.
    """

    def __init__(self, refused: dict[int, ResourceExhaustedError]) -> None:
        super().__init__(f"{len(refused)} creates refused by the deployment's limits")
        self.refused = refused


class LiveCounts:
    """Counts a transaction's creates and endings and checks the creates against the limits."""

    def __init__(self, limits: LiveLimits) -> None:
        self._limits = limits

    @staticmethod
    def ending(connection: Connection, tally: Tally) -> Counter[str]:
        """Lock the generations ``tally`` ends that are stored live; how many per organization.

        Run it before the batch's rows are written. (A create is committed before
        anything else of its generation is queued, so no batch creates and ends one.)
        """
        if not tally.finishing:
            return Counter()
        params = {"ids": tally.finishing, "terminal": _TERMINAL}
        return Counter(row.organization for row in connection.execute(_ENDING, params))

    def apply(self, connection: Connection, tally: Tally, ended: Counter[str]) -> bool:
        """Count ``tally``'s creates and the ``ended`` generations; False if nothing changed.

        Run it last in the transaction, after the batch's rows are written.

        Raises:
            LimitReached: some creates are beyond a limit; roll the transaction back.
        """
        wanted = Counter(org for org in tally.creates if org is not None)
        delta = Counter(wanted)
        delta.subtract(ended)
        if not wanted and not ended:
            return False
        keys = sorted((ORGANIZATION, org) for org in delta)
        keys.insert(0, (DEPLOYMENT, ""))
        params = {
            "scopes": [scope for scope, _ in keys],
            "organizations": [org for _, org in keys],
            "deltas": [delta.total(), *(delta[org] for _, org in keys[1:])],
        }
        rows = connection.execute(_COUNT, params).all()
        if wanted:
            live = {(row.scope, row.organization): int(row.live) for row in rows}
            refused = self._refused(tally.creates, wanted, live)
            if refused:
                raise LimitReached(refused)
        return True

    def _refused(
        self,
        creates: list[str | None],
        wanted: Counter[str],
        live: dict[tuple[str, str], int],
    ) -> dict[int, ResourceExhaustedError]:
        """Which creates, in batch order, find no room: places left = limit - counts before them."""
        limits = self._limits
        total_room = limits.total - (live[(DEPLOYMENT, "")] - wanted.total())
        room = {
            org: limits.per_organization - (live[(ORGANIZATION, org)] - n)
            for org, n in wanted.items()
        }
        refused: dict[int, ResourceExhaustedError] = {}
        for index, org in enumerate(creates):
            if org is None:
                continue
            if total_room <= 0:
                refused[index] = queue_full(limits.retry_after)
            elif room[org] <= 0:
                refused[index] = organization_full(limits.per_organization, limits.retry_after)
            else:
                total_room -= 1
                room[org] -= 1
        return refused
