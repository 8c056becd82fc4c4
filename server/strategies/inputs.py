"""Plain request inputs the API layer decodes into; they know nothing of protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.domain.enums import GenerationType
from server.domain.errors import FieldViolation


@dataclass(frozen=True, slots=True)
class AgenticInput:
    """The AGENTIC configuration as asked; None means "use the default"."""

    max_attempts: int | None = None
    min_confidence_score: float | None = None
    evaluation_provider: str = ""


@dataclass(frozen=True, slots=True)
class CreateOptions:
    """What every create request carries besides the strategy's parameters."""

    request_id: str = ""
    type: GenerationType | None = None
    agentic: AgenticInput | None = None
    labels: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None
    validate_only: bool = False
    # Fields the API layer could not decode, reported with every other violation.
    problems: tuple[FieldViolation, ...] = ()


@dataclass(frozen=True, slots=True)
class GenerateInput:
    """The GENERATE parameters as asked; zero values mean "default" where documented."""

    batch_size: int = 0
    subject_id: str = ""
    product_id: str = ""
    style_id: str = ""
    shot_type_string: str = ""
    generated_prompt: str = ""
    auto_generate_prompt: bool = False
    width: int = 0
    height: int = 0
    seed: int | None = None
    subject_lora_weight: float | None = None
    product_lora_weight: float | None = None
    style_lora_weight: float | None = None
    negative_prompt: str = ""
    steps: int = 0
