"""Workflows by orchestration type: a registry that refuses duplicates and names what it has."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from server.domain.enums import GenerationType
from server.domain.errors import UnimplementedError
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
