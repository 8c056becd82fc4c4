"""The state machines of DESIGN §3: every legal transition, in one table each."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar

from server.domain.enums import AttemptStatus as A
from server.domain.enums import GenerationStatus as G
from server.domain.enums import PredictionStatus as P
from server.domain.enums import TaskStatus as T
from server.domain.errors import IllegalTransitionError

GENERATION_TRANSITIONS: Mapping[G, frozenset[G]] = {
    G.PENDING: frozenset({G.PROCESSING, G.FAILED, G.CANCELLING, G.CANCELLED}),
    G.PROCESSING: frozenset(
        {G.COMPLETED, G.PARTIALLY_COMPLETED, G.FAILED, G.CANCELLING, G.CANCELLED}
    ),
    G.CANCELLING: frozenset({G.CANCELLED}),
    G.COMPLETED: frozenset(),
    G.PARTIALLY_COMPLETED: frozenset(),
    G.FAILED: frozenset(),
    G.CANCELLED: frozenset(),
}

PREDICTION_TRANSITIONS: Mapping[P, frozenset[P]] = {
    P.PENDING: frozenset({P.GENERATING, P.ERROR, P.CANCELLED}),
    P.GENERATING: frozenset({P.EVALUATING, P.COMPLETED, P.ERROR, P.CANCELLED}),
    P.EVALUATING: frozenset({P.GENERATING, P.COMPLETED, P.ERROR, P.CANCELLED}),
    P.COMPLETED: frozenset(),
    P.ERROR: frozenset(),
    P.CANCELLED: frozenset(),
}

TASK_TRANSITIONS: Mapping[T, frozenset[T]] = {
    T.PENDING: frozenset({T.RUNNING, T.COMPLETED, T.FAILED, T.CANCELLED}),
    T.RUNNING: frozenset({T.COMPLETED, T.FAILED, T.CANCELLED}),
    T.COMPLETED: frozenset(),
    T.FAILED: frozenset(),
    T.CANCELLED: frozenset(),
}

ATTEMPT_TRANSITIONS: Mapping[A, frozenset[A]] = {
    A.PENDING: frozenset({A.RUNNING, A.FAILED, A.CANCELLED}),
    A.RUNNING: frozenset({A.EVALUATING, A.FAILED, A.CANCELLED}),
    A.EVALUATING: frozenset({A.EVALUATED, A.FAILED, A.CANCELLED}),
    A.EVALUATED: frozenset(),
    A.FAILED: frozenset(),
    A.CANCELLED: frozenset(),
}

S = TypeVar("S", bound=StrEnum)


def is_terminal(table: Mapping[S, frozenset[S]], state: S) -> bool:
    """Tell whether ``state`` has no way out in ``table``."""
    return not table[state]


def check_transition(table: Mapping[S, frozenset[S]], current: S, target: S) -> None:
    """Raise unless ``current -> target`` is legal in ``table``.

    Raises:
        IllegalTransitionError: the transition is not in the table.
    """
    if target not in table[current]:
        raise IllegalTransitionError(f"illegal transition {current} -> {target}")


GENERATION_TERMINAL = frozenset(s for s in G if is_terminal(GENERATION_TRANSITIONS, s))
PREDICTION_TERMINAL = frozenset(s for s in P if is_terminal(PREDICTION_TRANSITIONS, s))
TASK_TERMINAL = frozenset(s for s in T if is_terminal(TASK_TRANSITIONS, s))
ATTEMPT_TERMINAL = frozenset(s for s in A if is_terminal(ATTEMPT_TRANSITIONS, s))
