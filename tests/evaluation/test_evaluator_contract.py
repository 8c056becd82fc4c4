"""The Evaluator contract, one suite for every evaluator: local, remote and the fake.

The remote evaluator talks to the project's compute server in its own process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from conftest import COMPUTE_TOKEN
from helpers import png_bytes

from server.domain.enums import Strategy
from server.domain.model import Expectations
from server.evaluation.base import EvaluationError, EvaluationInput, Evaluator, Evaluators
from server.evaluation.fake import ScriptedEvaluator
from server.evaluation.local import LocalEvaluator
from server.evaluation.remote import RemoteEvaluator

ITEM = EvaluationInput(
    output=png_bytes((40, 120, 200), (96, 64)),
    strategy=Strategy.FACE_FIXING,
    expected_size=(96, 64),
    base=png_bytes((40, 120, 200), (96, 64)),
    edited_region="faces",
    expects_face=True,
    expectations=Expectations(framing="head and shoulders"),
)


@pytest.fixture(params=["local", "remote", "fake"])
async def evaluator(request: pytest.FixtureRequest) -> AsyncIterator[Evaluator]:
    chosen: Evaluator
    if request.param == "local":
        chosen = LocalEvaluator(max_pixels=10**7)
    elif request.param == "remote":
        url = request.getfixturevalue("compute_server")
        chosen = RemoteEvaluator(url, token=COMPUTE_TOKEN)
    else:
        chosen = ScriptedEvaluator([0.42])
    yield chosen
    close = getattr(chosen, "aclose", None)
    if close is not None:
        await close()


async def test_an_evaluation_is_scores_in_range_with_its_provider(evaluator: Evaluator) -> None:
    evaluation = await evaluator.evaluate(ITEM)
    assert 0.0 <= evaluation.score <= 1.0
    assert evaluation.criteria
    assert all(0.0 <= value <= 1.0 for value in evaluation.criteria.values())
    assert evaluation.provider == evaluator.name
    assert isinstance(evaluation.feedback, str)


@pytest.mark.parametrize("kind", ["local", "remote"])
async def test_an_output_that_is_not_an_image_is_an_evaluation_error(
    kind: str, request: pytest.FixtureRequest
) -> None:
    evaluator: Evaluator
    if kind == "local":
        evaluator = LocalEvaluator(max_pixels=10**7)
    else:
        evaluator = RemoteEvaluator(request.getfixturevalue("compute_server"), token=COMPUTE_TOKEN)
    try:
        with pytest.raises(EvaluationError):
            await evaluator.evaluate(EvaluationInput(output=b"\x00" * 64, strategy=Strategy.REFINE))
    finally:
        close = getattr(evaluator, "aclose", None)
        if close is not None:
            await close()


def test_auto_is_remote_when_there_is_one_else_local() -> None:
    local, remote = ScriptedEvaluator([0.1], name="local"), ScriptedEvaluator([0.2], name="remote")
    assert Evaluators({"local": local}).get("auto") is local
    both = Evaluators({"local": local, "remote": remote})
    assert both.get("auto") is remote
    assert both.names == ("auto", "local", "remote")
    with pytest.raises(ValueError, match="auto"):
        Evaluators({"auto": local})
