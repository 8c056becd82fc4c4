"""The BASE workflow: each prediction's task chain, submitted concurrently, results recorded.

No evaluation and no retries. A prediction's tasks run in (attempt, step) order, each
reading its predecessor's output; the last one's output is the prediction's artifact.
"""

from __future__ import annotations

from server.domain.enums import PredictionStatus
from server.domain.model import Prediction
from server.orchestration.inputs import chain_output
from server.orchestration.live import LiveGeneration, Stopped
from server.orchestration.steps import TaskRunner
from server.orchestration.workflows import run_predictions


class BaseWorkflow:
    """Runs every unfinished prediction, then settles the generation."""

    def __init__(self, runner: TaskRunner) -> None:
        self._runner = runner

    async def run(self, live: LiveGeneration) -> None:
        """Drive the generation to its final status.

        Raises:
            Stopped: it was cancelled or expired; the engine closes it.
        """
        await run_predictions(live, self._prediction)

    async def _prediction(self, live: LiveGeneration, prediction: Prediction) -> None:
        try:
            for task in sorted(prediction.tasks, key=lambda t: (t.attempt_number, t.step)):
                if task.done:
                    continue
                outcome = await self._runner.run(live, prediction, task)
                if outcome.error is not None:
                    live.recorder.prediction_status(
                        prediction, PredictionStatus.ERROR, error=outcome.error
                    )
                    break
                if outcome.artifact is None:
                    continue
                if task is prediction.tasks[-1]:
                    prediction.artifact = outcome.artifact
                    live.recorder.prediction_status(prediction, PredictionStatus.COMPLETED)
                else:
                    chain_output(live, prediction, task, outcome.artifact)
            if any(not p.done for p in live.generation.predictions):
                live.flush_soon()  # others still run: let watchers see this one now
        except Stopped:
            return  # the run loop sees the token and the engine closes the generation
