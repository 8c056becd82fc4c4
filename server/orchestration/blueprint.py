"""A validated request and its plan, turned into the records of a new generation."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from server.domain.enums import (
    GenerationStatus,
    GenerationType,
    PredictionStatus,
    Strategy,
    TaskStatus,
)
from server.domain.ids import IdSource
from server.domain.model import ComputeTask, Generation, Orchestration, Prediction
from server.domain.recorder import utcnow
from server.strategies.base import Plan
from server.strategies.inputs import CreateOptions


def build_generation(
    ids: IdSource,
    org: str,
    strategy: Strategy,
    options: CreateOptions,
    orchestration: Orchestration,
    params: dict[str, Any],
    plan: Plan,
    fingerprint: str,
    *,
    preview: bool = False,
) -> Generation:
    """The records of a new generation in PENDING; a ``preview`` has no ids.

    Each planned prediction becomes a prediction with its chain of tasks (steps 0..n-1
    of attempt 1).
    """

    def new_id() -> str:
        return "" if preview else ids.new()

    now = utcnow()
    predictions = []
    for index, planned in enumerate(plan.predictions):
        prediction_id = new_id()
        tasks = [
            ComputeTask(
                id=new_id(),
                prediction_id=prediction_id,
                task_type=task.task_type,
                status=TaskStatus.PENDING,
                params=task.params,
                created_at=now,
                step=step,
            )
            for step, task in enumerate(planned.tasks)
        ]
        predictions.append(
            Prediction(
                id=prediction_id,
                index=index,
                seed=planned.seed,
                status=PredictionStatus.PENDING,
                created_at=now,
                tasks=tasks,
            )
        )
    timeout = options.timeout_s
    return Generation(
        id=new_id(),
        organization=org,
        type=orchestration.type,
        strategy=strategy,
        status=GenerationStatus.PENDING,
        params=params,
        orchestration=orchestration,
        created_at=now,
        request_id=options.request_id,
        fingerprint=fingerprint,
        labels=dict(sorted(options.labels.items())),
        predictions=predictions,
        deadline_at=now + timedelta(seconds=timeout) if timeout else None,
        refinement=plan.refinement,
    )


def fingerprint(strategy: Strategy, options: CreateOptions, params: dict[str, Any]) -> str:
    """A digest of everything that makes two create requests the same request."""
    body = {
        "strategy": strategy.value,
        "params": params,
        "type": (options.type or GenerationType.BASE).value,
        "agentic": asdict(options.agentic) if options.agentic else None,
        "labels": options.labels,
        "timeout": options.timeout_s,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
