"""Plain request inputs the API layer decodes into; they know nothing of protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.domain.enums import EditingTool, GenerationType
from server.domain.errors import FieldViolation


@dataclass(frozen=True, slots=True)
class AgenticInput:
    """The AGENTIC configuration as asked; None means "use the default"."""

    max_attempts: int | None = None
    min_confidence_score: float | None = None
    evaluation_provider: str = ""
    framing: str = ""
    view_angle: str = ""
    gender: str = ""
    instructions: str = ""


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


@dataclass(frozen=True, slots=True)
class EditingInput:
    """The EDITING parameters as asked; ``tool`` is None when unspecified."""

    base_img_path: str = ""
    reference_images: tuple[str, ...] = ()
    subject_id: str = ""
    product_id: str = ""
    tool: EditingTool | None = None
    width: int = 0
    height: int = 0
    detail_enhancer: bool = False
    seed: int | None = None
    prompt: str = ""


@dataclass(frozen=True, slots=True)
class RefineInput:
    """The REFINE parameters as asked."""

    base_image_url: str = ""
    batch_size: int = 0
    target_width: int = 0
    target_height: int = 0
    upscale_enabled: bool = False
    upscale_factor: float = 0.0
    upscale_steps: int = 0
    upscale_denoise: float | None = None
    face_detail_enabled: bool = False
    face_detail_steps: int = 0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class VideoInput:
    """The VIDEO parameters as asked; ``duration_s`` is None when unset."""

    base_image_url: str = ""
    motion_bucket_id: int = 0
    fps: int = 0
    duration_s: float | None = None
    seed: int | None = None
    # Fields the API layer could not decode (a malformed Duration).
    problems: tuple[FieldViolation, ...] = ()


@dataclass(frozen=True, slots=True)
class BackgroundFixingInput:
    """The BACKGROUND_FIXING parameters as asked."""

    base_image_url: str = ""
    background_prompt: str = ""
    background_image_url: str = ""
    mask_expansion: int = 0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class ImageAdjustingInput:
    """The IMAGE_ADJUSTING parameters as asked; unset adjustments are None."""

    base_image_url: str = ""
    brightness: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    prompt: str = ""
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class FaceFixingInput:
    """The FACE_FIXING parameters as asked."""

    base_image_url: str = ""
    strength: float | None = None
    prompt: str = ""
    seed: int | None = None
