"""A validated request and its plan, turned into the records of a new generation."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from server.domain.enums import (
    AttemptStatus,
    GenerationStatus,
    GenerationType,
    PredictionStatus,
    Strategy,
    TaskStatus,
)
from server.domain.ids import IdSource
from server.domain.model import (
    Attempt,
    ComputeTask,
    Generation,
    OrchestratedShot,
    Orchestration,
    PlannedStep,
    Prediction,
)
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
    of attempt 1); under AGENTIC also its shot, holding attempt 1 and the plan every
    later attempt starts from.
    """

    def new_id() -> str:
        return "" if preview else ids.new()

    now = utcnow()
    agentic = orchestration.agentic if orchestration.type is GenerationType.AGENTIC else None
    predictions = []
    for index, planned in enumerate(plan.predictions):
        prediction_id = new_id()
        attempt_id = new_id() if agentic is not None else ""
        tasks = [
            ComputeTask(
                id=new_id(),
                prediction_id=prediction_id,
                task_type=task.task_type,
                status=TaskStatus.PENDING,
                params=task.params,
                created_at=now,
                attempt_id=attempt_id,
                step=step,
            )
            for step, task in enumerate(planned.tasks)
        ]
        shot = None
        if agentic is not None:
            first = Attempt(
                id=attempt_id,
                prediction_id=prediction_id,
                number=1,
                status=AttemptStatus.PENDING,
                seed=planned.seed,
                created_at=now,
                task_ids=[t.id for t in tasks],
            )
            shot = OrchestratedShot(
                config=agentic,
                attempt_count=1,
                attempts=[first],
                plan=[PlannedStep(t.task_type, copy.deepcopy(t.params)) for t in planned.tasks],
            )
        predictions.append(
            Prediction(
                id=prediction_id,
                index=index,
                seed=planned.seed,
                status=PredictionStatus.PENDING,
                created_at=now,
                tasks=tasks,
                agentic=shot,
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
