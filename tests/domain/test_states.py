"""The state machines: terminal states are final and illegal moves are refused."""

from __future__ import annotations

import pytest

from server.domain.enums import GenerationStatus, PredictionStatus, TaskStatus
from server.domain.errors import IllegalTransitionError
from server.domain.states import (
    GENERATION_TERMINAL,
    GENERATION_TRANSITIONS,
    PREDICTION_TERMINAL,
    PREDICTION_TRANSITIONS,
    TASK_TERMINAL,
    TASK_TRANSITIONS,
    check_transition,
)


def test_every_state_has_a_row() -> None:
    assert set(GENERATION_TRANSITIONS) == set(GenerationStatus)
    assert set(PREDICTION_TRANSITIONS) == set(PredictionStatus)
    assert set(TASK_TRANSITIONS) == set(TaskStatus)


def test_terminal_sets() -> None:
    assert {s.value for s in GENERATION_TERMINAL} == {
        "COMPLETED",
        "PARTIALLY_COMPLETED",
        "FAILED",
        "CANCELLED",
    }
    assert {s.value for s in PREDICTION_TERMINAL} == {"COMPLETED", "ERROR", "CANCELLED"}
    assert {s.value for s in TASK_TERMINAL} == {"COMPLETED", "FAILED", "CANCELLED"}


@pytest.mark.parametrize("state", sorted(GENERATION_TERMINAL))
def test_terminal_generation_never_moves(state: GenerationStatus) -> None:
    for target in GenerationStatus:
        with pytest.raises(IllegalTransitionError):
            check_transition(GENERATION_TRANSITIONS, state, target)


def test_cancelling_only_ends_cancelled() -> None:
    check_transition(
        GENERATION_TRANSITIONS, GenerationStatus.CANCELLING, GenerationStatus.CANCELLED
    )
    with pytest.raises(IllegalTransitionError):
        check_transition(
            GENERATION_TRANSITIONS, GenerationStatus.CANCELLING, GenerationStatus.COMPLETED
        )


def test_no_skipping_back() -> None:
    with pytest.raises(IllegalTransitionError):
        check_transition(TASK_TRANSITIONS, TaskStatus.RUNNING, TaskStatus.PENDING)
    with pytest.raises(IllegalTransitionError):
        check_transition(
            PREDICTION_TRANSITIONS, PredictionStatus.GENERATING, PredictionStatus.PENDING
        )
