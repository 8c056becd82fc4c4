"""The AGENTIC workflow: per prediction, attempt -> evaluate -> accept, or adjust and retry.

Each prediction loops on its own (predictions run concurrently): run the current
attempt's chain of tasks, evaluate its output outside any compute slot, and accept it
when it scores at least ``min_confidence_score``; otherwise, while fewer than
``max_attempts`` attempts were made, plan the next one from the evaluation (see
``adjust``) and run it. When attempts run out the best-scoring attempt is accepted (the
earliest on ties); when every attempt failed, the prediction ends in ERROR.

No attempt is wasted: a planned attempt that would compute what an earlier one did is
not run (the best so far is accepted, stop reason NO_FURTHER_CHANGE), and an output
byte-identical to an earlier attempt's is not judged again nor counted as a new
candidate: it takes that attempt's evaluation, marked as a repeat, and the loop goes on
from it.

Everything the loop needs lives in the records, so a restart continues where it stood:
an attempt's unfinished tasks are re-attached or submitted, an evaluation that was under
way is done again, and a decision not yet recorded is taken again.
"""

from __future__ import annotations

import logging

from server.domain.enums import AttemptStatus, PredictionStatus, StopReason, Strategy, TaskStatus
from server.domain.ids import IdSource
from server.domain.model import (
    Attempt,
    ComputeTask,
    Evaluation,
    OrchestratedShot,
    PlannedStep,
    Prediction,
    ResourceError,
)
from server.domain.recorder import utcnow
from server.evaluation.base import EvaluationError, EvaluationInput, Evaluators
from server.media.storage import ArtifactStorage
from server.orchestration.adjust import Retry, plan_retry, repeated
from server.orchestration.inputs import chain_output, reuse_fetched
from server.orchestration.live import LiveGeneration, Stopped
from server.orchestration.steps import TaskRunner
from server.orchestration.workflows import run_predictions

log = logging.getLogger(__name__)

# Where each strategy's output may depart from its base image (see EvaluationInput).
_EDITED_REGION = {
    Strategy.FACE_FIXING: "faces",
    Strategy.REFINE: "none",
    Strategy.VIDEO: "none",
}
_FACE_WORDS = ("portrait", "face", "close-up", "closeup", "headshot", "head")


class AgenticWorkflow:
    """Runs every unfinished prediction's attempt loop, then settles the generation."""

    def __init__(self, runner: TaskRunner, evaluators: Evaluators, files: ArtifactStorage) -> None:
        self._runner = runner
        self._evaluators = evaluators
        self._files = files
        self._ids = IdSource()

    async def run(self, live: LiveGeneration) -> None:
        """Drive the generation to its final status.

        Raises:
            Stopped: it was cancelled or expired; the engine closes it.
        """
        await run_predictions(live, self._shot)

    async def _shot(self, live: LiveGeneration, prediction: Prediction) -> None:
        shot = _shot_of(prediction)
        try:
            while True:
                attempt = shot.attempts[-1]
                if not attempt.done:
                    await self._attempt(live, prediction, attempt)
                retry = self._decide(live, prediction, shot)
                if retry is None:
                    break
                self._retry(live, prediction, shot, retry)
                live.flush_soon()
            if any(not p.done for p in live.generation.predictions):
                live.flush_soon()
        except Stopped:
            return

    # -- one attempt ----------------------------------------------------------------------

    async def _attempt(
        self, live: LiveGeneration, prediction: Prediction, attempt: Attempt
    ) -> None:
        recorder = live.recorder
        if attempt.status is AttemptStatus.PENDING:
            live.token.check()
            recorder.attempt_status(attempt, AttemptStatus.RUNNING)
            if prediction.status is PredictionStatus.EVALUATING:
                recorder.prediction_status(prediction, PredictionStatus.GENERATING)
        if attempt.status is AttemptStatus.RUNNING:
            chain = sorted(
                (t for t in prediction.tasks if t.attempt_id == attempt.id), key=lambda t: t.step
            )
            for task in chain:
                if task.done:
                    continue
                outcome = await self._runner.run(live, prediction, task)
                if outcome.error is not None:
                    recorder.attempt_status(attempt, AttemptStatus.FAILED, error=outcome.error)
                    return
                if outcome.artifact is None:
                    continue
                if task is chain[-1]:
                    attempt.artifact = outcome.artifact
                    recorder.attempt_status(attempt, AttemptStatus.EVALUATING)
                    recorder.prediction_status(prediction, PredictionStatus.EVALUATING)
                else:
                    chain_output(live, prediction, task, outcome.artifact)
            live.flush_soon()
        if attempt.status is AttemptStatus.EVALUATING:
            await self._evaluate(live, prediction, attempt)

    async def _evaluate(
        self, live: LiveGeneration, prediction: Prediction, attempt: Attempt
    ) -> None:
        """Evaluate the attempt's output (no compute slot held) and record the result."""
        shot = _shot_of(prediction)
        recorder = live.recorder
        if self._repeat_of_output(live, shot, attempt):
            return
        try:
            item = await self._input(live, prediction, attempt)
            evaluator = self._evaluators.get(shot.config.evaluation_provider)
            evaluation: Evaluation = await live.token.race(evaluator.evaluate(item))
        except (EvaluationError, KeyError, OSError) as exc:
            error = ResourceError.evaluation_failed(str(exc))
            recorder.attempt_status(attempt, AttemptStatus.FAILED, error=error)
            return
        attempt.evaluation = evaluation
        recorder.attempt_status(
            attempt,
            AttemptStatus.EVALUATED,
            note=f"attempt {attempt.number} scored {evaluation.score:.2f}: {evaluation.feedback}",
        )
        best = shot.attempt(shot.best_attempt) if shot.best_attempt else None
        if best is None or best.evaluation is None or evaluation.score > best.evaluation.score:
            shot.best_attempt = attempt.number
            prediction.score = evaluation.score
            recorder.prediction_changed(prediction)

    async def _input(
        self, live: LiveGeneration, prediction: Prediction, attempt: Attempt
    ) -> EvaluationInput:
        """What the evaluator sees: the output, the base image and the expectations."""
        artifact = attempt.artifact
        if artifact is None:  # pragma: no cover - EVALUATING is only recorded with one
            raise EvaluationError(f"attempt {attempt.number} has no output")
        output = await self._files.read(artifact.sha256)
        first = min(
            (t for t in prediction.tasks if t.attempt_id == attempt.id), key=lambda t: t.step
        )
        strategy = live.generation.strategy
        base_ref = first.params.get("base_image") if strategy is not Strategy.EDITING else None
        base = None
        if isinstance(base_ref, str) and base_ref.startswith("artifact:"):
            sha = base_ref.removeprefix("artifact:")
            base = await self._files.read(sha)
        return EvaluationInput(
            output=output,
            strategy=strategy,
            expected_size=_expected_size(first),
            base=base,
            edited_region=_EDITED_REGION.get(strategy, "all"),
            expects_face=_expects_face(strategy, first),
            expectations=_shot_of(prediction).config.expectations,
        )

    @staticmethod
    def _repeat_of_output(live: LiveGeneration, shot: OrchestratedShot, attempt: Attempt) -> bool:
        """Whether ``attempt``'s output repeats an evaluated earlier one's, byte for byte.

        If so it takes that evaluation (marked, so the repeat is visible), is recorded as
        EVALUATED and is never the best: the same bytes are not a new candidate.
        """
        sha = attempt.artifact.sha256 if attempt.artifact is not None else ""
        same = next(
            (
                a
                for a in shot.attempts
                if a.number < attempt.number
                and a.status is AttemptStatus.EVALUATED
                and a.evaluation is not None
                and a.artifact is not None
                and a.artifact.sha256 == sha
            ),
            None,
        )
        if same is None or same.evaluation is None:
            return False
        marker = f"same output as attempt {same.number}: not a new candidate"
        earlier = same.evaluation
        attempt.evaluation = Evaluation(
            score=earlier.score,
            criteria=dict(earlier.criteria),
            feedback=f"{marker}; {earlier.feedback}",
            provider=earlier.provider,
            measures=dict(earlier.measures),
        )
        note = f"attempt {attempt.number}'s output is byte-identical to attempt {same.number}'s"
        live.recorder.attempt_status(attempt, AttemptStatus.EVALUATED, note=f"{note}: {marker}")
        return True

    # -- deciding and retrying ------------------------------------------------------------

    def _decide(
        self, live: LiveGeneration, prediction: Prediction, shot: OrchestratedShot
    ) -> Retry | None:
        """Accept, give up, or the next attempt to run; records the outcome."""
        last = shot.attempts[-1]
        config = shot.config
        evaluation = last.evaluation
        if (
            last.status is AttemptStatus.EVALUATED
            and evaluation is not None
            and evaluation.score >= config.min_confidence_score
        ):
            note = (
                f"accepted attempt {last.number}: score {evaluation.score:.2f} "
                f">= {config.min_confidence_score:.2f}"
            )
            self._accept(live, prediction, last, StopReason.THRESHOLD_MET, note)
            return None
        if last.number < config.max_attempts:
            return self._next_or_stop(live, prediction, shot)
        if shot.best_attempt:
            best = shot.attempt(shot.best_attempt)
            score = best.evaluation.score if best.evaluation else 0.0
            note = (
                f"accepted attempt {best.number}, the best of {last.number} "
                f"(score {score:.2f}, below {config.min_confidence_score:.2f})"
            )
            self._accept(live, prediction, best, StopReason.ATTEMPTS_EXHAUSTED, note)
            return None
        shot.stop_reason = StopReason.FAILED
        error = last.error or ResourceError.evaluation_failed("every attempt failed")
        live.recorder.prediction_status(
            prediction,
            PredictionStatus.ERROR,
            error=error,
            note=f"every one of {last.number} attempts failed",
        )
        return None

    @staticmethod
    def _accept(
        live: LiveGeneration,
        prediction: Prediction,
        attempt: Attempt,
        reason: StopReason,
        note: str,
    ) -> None:
        shot = _shot_of(prediction)
        shot.stop_reason = reason
        shot.best_attempt = attempt.number
        prediction.artifact = attempt.artifact
        prediction.seed = attempt.seed
        prediction.score = attempt.evaluation.score if attempt.evaluation else None
        live.recorder.prediction_status(prediction, PredictionStatus.COMPLETED, note=note)

    @staticmethod
    def _base_plan(prediction: Prediction, shot: OrchestratedShot) -> list[PlannedStep]:
        """The chain every attempt starts from, reading what attempt 1 fetched."""
        first = shot.attempts[0]
        first_tasks = sorted(
            (t for t in prediction.tasks if t.attempt_id == first.id), key=lambda t: t.step
        )
        return [
            reuse_fetched(step, task) for step, task in zip(shot.plan, first_tasks, strict=True)
        ]

    def _next_or_stop(
        self, live: LiveGeneration, prediction: Prediction, shot: OrchestratedShot
    ) -> Retry | None:
        """The attempt after the last one; None (the best accepted) if it changes nothing.

        An attempt that would compute what an evaluated earlier one did would only repeat
        its output: the loop stops there with NO_FURTHER_CHANGE.
        """
        last = shot.attempts[-1]
        strategy = live.generation.strategy
        plan = self._base_plan(prediction, shot)
        retry = plan_retry(strategy, plan, last, last.number + 1, shot.attempts[0].seed)
        same = repeated(strategy, plan, retry.steps, shot.attempts)
        if same is None or not shot.best_attempt:
            return retry
        best = shot.attempt(shot.best_attempt)
        score = best.evaluation.score if best.evaluation else 0.0
        note = (
            f"attempt {last.number + 1} would compute what attempt {same.number} did "
            f"({retry.reason}): nothing more can be changed; accepted attempt {best.number}, "
            f"the best of {last.number} (score {score:.2f}, below "
            f"{shot.config.min_confidence_score:.2f})"
        )
        self._accept(live, prediction, best, StopReason.NO_FURTHER_CHANGE, note)
        return None

    def _retry(
        self, live: LiveGeneration, prediction: Prediction, shot: OrchestratedShot, retry: Retry
    ) -> None:
        """Record the next attempt and its chain of tasks, all in one commit."""
        live.token.check()
        number = shot.attempts[-1].number + 1
        attempt = Attempt(
            id=self._ids.new(),
            prediction_id=prediction.id,
            number=number,
            status=AttemptStatus.PENDING,
            seed=retry.seed,
            created_at=utcnow(),
            adjustments=retry.adjustments,
            adjustment_reason=retry.reason,
        )
        tasks = [
            ComputeTask(
                id=self._ids.new(),
                prediction_id=prediction.id,
                task_type=step.task_type,
                status=TaskStatus.PENDING,
                params=step.params,
                created_at=attempt.created_at,
                attempt_id=attempt.id,
                attempt_number=number,
                step=index,
            )
            for index, step in enumerate(retry.steps)
        ]
        attempt.task_ids = [t.id for t in tasks]
        recorder = live.recorder
        shot.attempts = [*shot.attempts, attempt]
        shot.attempt_count = number
        recorder.attempt_changed(attempt, note=f"retrying: {retry.reason}")
        for task in tasks:
            recorder.task_added(prediction, task)
        recorder.prediction_changed(prediction)


def _shot_of(prediction: Prediction) -> OrchestratedShot:
    shot = prediction.agentic
    if shot is None:  # pragma: no cover - the blueprint gives every AGENTIC prediction one
        raise ValueError(f"prediction {prediction.id} has no AGENTIC record")
    return shot


def _expected_size(first: ComputeTask) -> tuple[int, int] | None:
    """The output size the request fixes, when it does (GENERATE, EDITING, REFINE)."""
    params = first.params
    for w_key, h_key in (("width", "height"), ("target_width", "target_height")):
        width, height = params.get(w_key), params.get(h_key)
        if isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0:
            return width, height
    return None


def _expects_face(strategy: Strategy, first: ComputeTask) -> bool:
    """Whether the shot implies a visible face."""
    if strategy is Strategy.FACE_FIXING:
        return True
    if strategy is Strategy.REFINE:
        return bool(first.params.get("face_detail_enabled"))
    if strategy is Strategy.GENERATE and first.params.get("subject"):
        shot = str(first.params.get("shot_type", "")).lower()
        return any(word in shot for word in _FACE_WORDS)
    return False
