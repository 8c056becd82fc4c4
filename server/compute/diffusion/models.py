"""The model registry file: which diffusion model serves which task type, and how.

A TOML file named by ``SARTIQ_COMPUTE_SERVER__MODELS``. Models are named once and task
types point at them, so one set of weights loaded once serves several task types::

    memory_budget_gb = 20          # loaded pipelines kept within it (0: no bound)

    [models.sdxl]
    pipeline = "StableDiffusionXLPipeline"   # the text-to-image class in diffusers
    path = "/models/sdxl-base-1.0"           # a local diffusers directory
    dtype = "auto"                           # auto (fp16 on CUDA, fp32 on CPU) / float32 / ...
    device = "auto"                          # auto (cuda when present) / cpu / cuda / cuda:1
    scheduler = "EulerDiscreteScheduler"     # optional: replaces the model's own
    steps = 30
    guidance = 6.0

    [tasks]
    GENERATION = "sdxl"
    EDITING = "sdxl"

Reading it imports nothing heavy (no torch): the service and the compute server check it
at start. Nothing is ever downloaded: every path must be a local directory, and a missing
one stops the start with its name.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.domain.enums import TaskType

# Task types the diffusion provider runs, and the kind of pipeline each needs.
IMAGE_TASKS = frozenset(
    {
        TaskType.GENERATION,
        TaskType.EDITING,
        TaskType.DETAIL_ENHANCER,
        TaskType.REFINE,
        TaskType.BACKGROUND_FIX,
        TaskType.FACE_ENHANCER,
    }
)
VIDEO_TASKS = frozenset({TaskType.VIDEO_GENERATION})
# Image-to-video pipelines of diffusers the VIDEO_GENERATION processor drives.
VIDEO_PIPELINES = frozenset({"StableVideoDiffusionPipeline"})

Dtype = Literal["auto", "float32", "float16", "bfloat16"]


class ModelRegistryError(Exception):
    """The registry file is missing, malformed, or names weights that are not there."""


class Model(BaseModel):
    """One model: its pipeline class, its weights on disk, and how it runs by default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pipeline: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9]*Pipeline$")
    path: Path
    dtype: Dtype = "auto"
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$")
    scheduler: str | None = Field(default=None, pattern=r"^[A-Za-z][A-Za-z0-9]*Scheduler$")
    steps: int = Field(default=30, ge=1, le=500)
    guidance: float = Field(default=7.0, ge=0, le=50)

    @property
    def video(self) -> bool:
        """Whether this is an image-to-video pipeline."""
        return self.pipeline in VIDEO_PIPELINES


class ModelRegistry(BaseModel):
    """Every model, and the model each task type runs on (the others stay on the CPU)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_budget_gb: float = Field(default=0.0, ge=0)
    models: dict[str, Model] = Field(default_factory=dict)
    tasks: dict[TaskType, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _tasks_name_fitting_models(self) -> ModelRegistry:
        problems = []
        for task_type, name in self.tasks.items():
            model = self.models.get(name)
            if model is None:
                problems.append(f"tasks.{task_type.value} names model {name!r}, not defined")
            elif task_type in VIDEO_TASKS and not model.video:
                problems.append(
                    f"tasks.{task_type.value}: {name!r} is a {model.pipeline}, not one of "
                    f"{sorted(VIDEO_PIPELINES)}"
                )
            elif task_type in IMAGE_TASKS and model.video:
                problems.append(f"tasks.{task_type.value}: {name!r} makes videos, not images")
            elif task_type not in IMAGE_TASKS | VIDEO_TASKS:
                problems.append(f"tasks.{task_type.value}: runs on the CPU processor only")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def budget_bytes(self) -> int:
        """The memory budget in bytes; 0 means no bound."""
        return int(self.memory_budget_gb * 1024**3)

    def model_for(self, task_type: TaskType) -> tuple[str, Model] | None:
        """The name and model that serve ``task_type``; None when the CPU processor does."""
        name = self.tasks.get(task_type)
        return None if name is None else (name, self.models[name])


def load_registry(path: Path, *, check_paths: bool = True) -> ModelRegistry:
    """Read and check the registry file, and (``check_paths``) that its models are on disk.

    Raises:
        ModelRegistryError: the file is missing or malformed, or a model directory that a
            task type uses does not exist (the message names it).
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelRegistryError(f"cannot read the model registry {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelRegistryError(f"the model registry {path} is not TOML: {exc}") from None
    try:
        registry = ModelRegistry.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'registry'}: {error['msg']}"
            for error in exc.errors()
        )
        raise ModelRegistryError(f"the model registry {path} is not valid: {problems}") from None
    used = set(registry.tasks.values()) if check_paths else set()
    for name in sorted(used):
        model = registry.models[name]
        if not model.path.is_dir():
            raise ModelRegistryError(
                f"model {name!r}: its weights directory {model.path} does not exist "
                "(nothing is downloaded; put a diffusers directory there)"
            )
    return registry
