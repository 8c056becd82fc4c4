"""Workflows by orchestration type: a registry that refuses duplicates and names what it has."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol

from server.domain.enums import GenerationType
from server.domain.errors import UnimplementedError
from server.domain.model import Prediction
from server.orchestration.closing import settle
from server.orchestration.live import LiveGeneration


class Workflow(Protocol):
    """Drives a live generation to its final status."""

    async def run(self, live: LiveGeneration) -> None:
        """Run until the generation is settled.

        Raises:
            Stopped: cancelled or expired at a check point; the engine closes it.
        """
        ...


class WorkflowRegistry:
    """The workflow of each orchestration type this server runs."""

    def __init__(self, workflows: Mapping[GenerationType, Workflow]) -> None:
        self._workflows = dict(workflows)

    @property
    def types(self) -> tuple[GenerationType, ...]:
        """The orchestration types available, in declaration order."""
        return tuple(t for t in GenerationType if t in self._workflows)

    def get(self, kind: GenerationType) -> Workflow:
        """The workflow of ``kind``.

        Raises:
            UnimplementedError: no workflow is registered for it.
        """
        workflow = self._workflows.get(kind)
        if workflow is None:
            known = ", ".join(t.value for t in self.types) or "none"
            raise UnimplementedError(
                f"{kind.value} orchestration is not available on this server yet; "
                f"available: {known}",
                feature=f"GENERATION_TYPE_{kind.value}",
            )
        return workflow


async def run_predictions(
    live: LiveGeneration,
    run_one: Callable[[LiveGeneration, Prediction], Coroutine[Any, Any, None]],
) -> None:
    """Run ``run_one`` for every unfinished prediction concurrently, then settle.

    ``run_one`` returns when its prediction is done or the workflow was stopped.

    Raises:
        Stopped: it was cancelled or expired; the engine closes it.
    """
    unfinished = [p for p in live.generation.predictions if not p.done]
    async with asyncio.TaskGroup() as group:
        for prediction in unfinished:
            group.create_task(run_one(live, prediction))
    live.token.check()  # every prediction stopped at a check point: close instead
    settle(live)
    await live.flush()
