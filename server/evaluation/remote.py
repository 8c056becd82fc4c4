"""The remote evaluator: the compute server's ``POST /api/v1/evaluation/`` (see compute.wire).

The output and the base image travel as ``data:`` URIs with what the request expects
(expected size, edited region, face, and the caller's framing, view angle, gender and
instructions). Transient failures are retried briefly with the compute retry policy; a
failure that remains is an ``EvaluationError`` (the attempt counts as score 0).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import httpx

from server.compute.base import ComputeError
from server.compute.retry import RetryPolicy
from server.compute.wire import EVALUATION_PATH, data_uri
from server.domain.enums import ComputeErrorCategory
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
    ) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=httpx.Timeout(timeout_s)
        )
        self._retry = retry or RetryPolicy(budget_s=10.0)

    async def evaluate(self, item: EvaluationInput) -> Evaluation:
        """Ask the compute server to score ``item``.

        Raises:
            EvaluationError: it could not (after retries for transient failures).
        """
        body = {
            "image": data_uri(item.output),
            "base": None if item.base is None else data_uri(item.base),
            "strategy": item.strategy.value,
            "expected_size": None if item.expected_size is None else list(item.expected_size),
            "edited_region": item.edited_region,
            "expects_face": item.expects_face,
            "expectations": asdict(item.expectations),
        }
        try:
            answer = await self._retry.call(lambda: self._post(body))
            return Evaluation(
                score=float(answer["score"]),
                criteria={str(k): float(v) for k, v in answer.get("criteria", {}).items()},
                feedback=str(answer.get("feedback") or ""),
                provider=self.name,
                measures={str(k): float(v) for k, v in answer.get("measures", {}).items()},
            )
        except ComputeError as exc:
            raise EvaluationError(f"remote evaluation failed: {exc.message}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise EvaluationError(f"remote evaluation answered nonsense: {exc!r}") from exc

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._client.post(EVALUATION_PATH, json=body)
        except httpx.HTTPError as exc:
            raise ComputeError(ComputeErrorCategory.TRANSIENT, type(exc).__name__) from exc
        if response.status_code >= 500 or response.status_code == 429:
            raise ComputeError(ComputeErrorCategory.TRANSIENT, f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise ComputeError(ComputeErrorCategory.VALIDATION, response.text[:300])
        answer: dict[str, Any] = response.json()
        return answer

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
