"""The evaluator seam: what an evaluation sees, what it returns, and choosing a provider."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from server.domain.enums import Strategy
from server.domain.model import Evaluation, Expectations

AUTO = "auto"


@dataclass(frozen=True, slots=True)
class EvaluationInput:
    """One attempt's output and what it was asked to be.

    Attributes:
        output: The encoded output (an image, or a video whose first frame is judged).
        strategy: The generation's strategy.
        expected_size: The (width, height) the output should have, when the request fixes it.
        base: The encoded input image the strategy changed, when it has one.
        edited_region: Where the output may depart from ``base``: "all" (a global
            change), "faces" (only the detected faces), or "none" (nothing may move).
        expects_face: Whether the shot implies a visible face.
        expectations: What the request says the result should show (framing, view
            angle, gender, instructions); for evaluators that judge them.
    """

    output: bytes
    strategy: Strategy
    expected_size: tuple[int, int] | None = None
    base: bytes | None = None
    edited_region: str = "all"
    expects_face: bool = False
    expectations: Expectations = field(default_factory=Expectations)


class EvaluationError(Exception):
    """The evaluator could not judge the output (its reason is the message)."""


class Evaluator(Protocol):
    """Scores an output 0-1, per criterion and overall, with short feedback."""

    @property
    def name(self) -> str:
        """The provider name attempts record (e.g. "local")."""
        ...

    async def evaluate(self, item: EvaluationInput) -> Evaluation:
        """Judge ``item``.

        Raises:
            EvaluationError: the output could not be judged.
        """
        ...


class Evaluators:
    """The providers this server offers, by name; "auto" picks the remote one when present."""

    def __init__(self, providers: Mapping[str, Evaluator]) -> None:
        if AUTO in providers:
            raise ValueError(f"{AUTO!r} is not a provider name; it chooses one")
        if not providers:
            raise ValueError("at least one evaluation provider is required")
        self._providers = dict(providers)

    @property
    def names(self) -> tuple[str, ...]:
        """Every value ``AgenticConfig.evaluation_provider`` accepts, "auto" first."""
        return (AUTO, *sorted(self._providers))

    async def aclose(self) -> None:
        """Release what the providers hold (connection pools)."""
        for provider in self._providers.values():
            close = getattr(provider, "aclose", None)
            if close is not None:
                await close()

    def get(self, name: str) -> Evaluator:
        """The evaluator for ``name`` ("auto": remote when configured, else local).

        Raises:
            KeyError: no such provider (refused at create, so only a changed configuration
                between a create and a restart gets here).
        """
        if name == AUTO:
            name = "remote" if "remote" in self._providers else "local"
        return self._providers[name]
