"""The remote evaluator: the compute server's ``POST /api/v1/evaluation/`` (see compute.wire).

The output and the base image travel as ``data:`` URIs with what the request expects
(expected size, edited region, face, and the caller's framing, view angle, gender and
instructions). The call goes through the ``evaluation`` breaker and its answer through
the wire schema (``EvaluationAnswer``), like every compute call: a malformed answer is
transient. Transient failures are retried briefly with the compute retry policy; a
failure that remains is an ``EvaluationError`` (the attempt counts as score 0).
"""

from __future__ import annotations

from dataclasses import asdict

import httpx

from server.compute import transport
from server.compute.base import ComputeError
from server.compute.breaker import Breakers
from server.compute.retry import RetryPolicy
from server.compute.wire import (
    EVALUATION_PATH,
    EvaluationAnswer,
    EvaluationRequest,
    Expectations,
    data_uri,
)
from server.domain.model import Evaluation
from server.evaluation.base import EvaluationError, EvaluationInput


class RemoteEvaluator:
    """Scores outputs on a compute server."""

    name = "remote"

    def __init__(
        self,
        base_url: str,
        *,
        token: str = "",
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        breakers: Breakers | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=httpx.Timeout(timeout_s)
        )
        self._retry = retry or RetryPolicy(budget_s=10.0)
        self._breaker = (breakers or Breakers())["evaluation"]

    async def evaluate(self, item: EvaluationInput) -> Evaluation:
        """Ask the compute server to score ``item``.

        Raises:
            EvaluationError: it could not (after retries for transient failures).
        """
        try:
            body = EvaluationRequest.model_validate(
                {
                    "image": data_uri(item.output),
                    "base": None if item.base is None else data_uri(item.base),
                    "strategy": item.strategy.value,
                    "expected_size": item.expected_size,
                    "edited_region": item.edited_region,
                    "expects_face": item.expects_face,
                    "expectations": Expectations(**asdict(item.expectations)),
                }
            ).model_dump(mode="json")
        except ValueError as exc:  # pydantic's ValidationError included
            raise EvaluationError(f"cannot ask for an evaluation of this input: {exc}") from None
        try:
            answer = await self._retry.call(
                lambda: transport.call(
                    self._client,
                    self._breaker,
                    EvaluationAnswer,
                    "POST",
                    EVALUATION_PATH,
                    json=body,
                )
            )
        except ComputeError as exc:
            raise EvaluationError(f"remote evaluation failed: {exc.message}") from exc
        return Evaluation(
            score=answer.score,
            criteria=dict(answer.criteria),
            feedback=answer.feedback,
            provider=self.name,
            measures=dict(answer.measures),
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
