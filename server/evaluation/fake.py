"""A scriptable evaluator for tests: scores in order, optionally held at a gate."""

from __future__ import annotations

import asyncio

from server.domain.model import Evaluation
from server.evaluation.base import EvaluationError, EvaluationInput


class ScriptedEvaluator:
    """Returns the scripted evaluations in call order (the last one repeats).

    Args:
        script: Each entry a score (criteria {"scripted": score}) or a whole Evaluation;
            an exception entry is raised instead.
        name: The provider name it is registered and recorded under.
    """

    def __init__(
        self, script: list[float | Evaluation | Exception], *, name: str = "local"
    ) -> None:
        if not script:
            raise ValueError("the script needs at least one entry")
        self.name = name
        self.script = list(script)
        self.calls: list[EvaluationInput] = []
        # When set and not yet released, evaluate() waits for it (a slow evaluator).
        self.gate: asyncio.Event | None = None

    async def evaluate(self, item: EvaluationInput) -> Evaluation:
        """The next scripted evaluation.

        Raises:
            EvaluationError: the script says so.
        """
        self.calls.append(item)
        if self.gate is not None:
            await self.gate.wait()
        entry = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(entry, Exception):
            raise EvaluationError(str(entry)) from entry
        if isinstance(entry, Evaluation):
            return entry
        return Evaluation(
            score=entry,
            criteria={"scripted": entry},
            feedback=f"scripted score {entry:.2f}",
            provider=self.name,
        )
