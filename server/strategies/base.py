"""The strategy handler interface and the registry that finds one by strategy."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from server.domain.enums import CatalogKind, PredictionStatus, Strategy, TaskType
from server.domain.errors import UnimplementedError, Violations
from server.domain.model import Artifact, CatalogEntity, Refine
from server.media.references import ReferencePolicy

# The compute task types each strategy's predictions may run, in chain order.
TASK_TYPES: dict[Strategy, tuple[TaskType, ...]] = {
    Strategy.GENERATE: (TaskType.GENERATION,),
    Strategy.EDITING: (TaskType.EDITING, TaskType.DETAIL_ENHANCER),
    Strategy.REFINE: (TaskType.REFINE,),
    Strategy.VIDEO: (TaskType.VIDEO_GENERATION,),
    Strategy.BACKGROUND_FIXING: (TaskType.BACKGROUND_FIX,),
    Strategy.IMAGE_ADJUSTING: (TaskType.IMAGE_ADJUSTER,),
    Strategy.FACE_FIXING: (TaskType.FACE_ENHANCER,),
}


@dataclass(frozen=True, slots=True)
class FieldLimit:
    """A numeric bound on a request field, as GetCapabilities reports it."""

    field: str
    minimum: float
    maximum: float
    description: str = ""


@dataclass(frozen=True, slots=True)
class PlannedTask:
    """One compute task of a prediction's chain, ready to be recorded."""

    task_type: TaskType
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PlannedPrediction:
    """One output slot: its seed and the chain of tasks that produces it, in order."""

    seed: int
    tasks: tuple[PlannedTask, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """What a validated request becomes: one task chain per prediction, and records.

    ``refinement`` is the extra record REFINE keeps (its ``Refine``).
    """

    predictions: tuple[PlannedPrediction, ...]
    refinement: Refine | None = None


@dataclass(frozen=True, slots=True)
class PredictionOutput:
    """An earlier prediction as an input: its status and, once COMPLETED, its artifact."""

    status: PredictionStatus
    artifact: Artifact | None


class EntityLookup(Protocol):
    """Where strategies find the catalog entities a request names."""

    async def entity(self, org: str, kind: CatalogKind, entity_id: str) -> CatalogEntity | None:
        """The entity, or None when ``org`` has none with this id and kind."""
        ...


class Lookups(EntityLookup, Protocol):
    """Where strategies find what a request names: catalog entities, earlier outputs."""

    async def prediction_output(self, org: str, prediction_id: str) -> PredictionOutput | None:
        """A prediction of ``org``'s, or None when it has none with this id."""
        ...

    async def artifact(self, org: str, sha256: str) -> Artifact | None:
        """An artifact ``org`` owns, or None."""
        ...


InputT = TypeVar("InputT", contravariant=True)


class StrategyHandler(Protocol[InputT]):
    """What a strategy knows: how to validate its input and which tasks to create."""

    strategy: Strategy
    limits: tuple[FieldLimit, ...]

    def normalize(self, raw: InputT, v: Violations, *, agentic: bool) -> dict[str, Any]:
        """Validate ``raw`` into the stored parameters, defaults filled, recording violations.

        ``agentic`` says the generation is AGENTIC, where the evaluator may choose
        changes a BASE request would have to state.
        """
        ...

    async def plan(self, lookups: Lookups, org: str, params: dict[str, Any]) -> Plan:
        """Load what the parameters reference and plan each prediction's task chain.

        It fills in what is chosen at create (the seed) in ``params``.

        Raises:
            NotFoundError: a referenced entity, prediction or artifact does not exist
                for ``org``.
            FailedPreconditionError: a referenced prediction has not completed.
            InvalidArgumentError: a fault only the referenced inputs reveal (e.g. an
                output size above the limit once the input size is known).
        """
        ...


class StrategyRegistry:
    """The strategies this service can run, registered by name at start-up."""

    def __init__(self, handlers: Iterable[StrategyHandler[Any]]) -> None:
        self._handlers: dict[Strategy, StrategyHandler[Any]] = {}
        for handler in handlers:
            if handler.strategy in self._handlers:
                raise ValueError(f"strategy {handler.strategy} is registered twice")
            self._handlers[handler.strategy] = handler

    def get(self, strategy: Strategy) -> StrategyHandler[Any]:
        """The handler of ``strategy``.

        Raises:
            UnimplementedError: the strategy is in the contract but not available yet.
        """
        handler = self._handlers.get(strategy)
        if handler is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            raise UnimplementedError(
                f"strategy {strategy} is not available on this server yet; available: {known}",
                feature=f"STRATEGY_{strategy.value}",
            )
        return handler

    def available(self) -> dict[Strategy, tuple[FieldLimit, ...]]:
        """The strategies registered here, with their limits."""
        return {strategy: handler.limits for strategy, handler in self._handlers.items()}


InputKind = TypeVar("InputKind")


def expect_input(raw: object, kind: type[InputKind], strategy: Strategy) -> InputKind:
    """``raw`` as the strategy's input type (what the API layer decodes requests to).

    Raises:
        TypeError: another type was passed (a bug in the caller).
    """
    if not isinstance(raw, kind):
        raise TypeError(f"{strategy.value} takes a {kind.__name__}, got {type(raw).__name__}")
    return raw


class ImageStrategy:
    """Base of the strategies that take image references, checked against one policy."""

    def __init__(self, policy: ReferencePolicy) -> None:
        self._policy = policy
