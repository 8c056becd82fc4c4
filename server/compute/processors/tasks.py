"""Adapters from the compute wire parameters to each CPU processor, and the default registry."""

from __future__ import annotations

from typing import Any

from server.compute.base import OutputFile
from server.compute.processors.generation import (
    GenerationInput,
    ReferenceSet,
    render_generation,
)
from server.compute.registry import ProcessorContext, ProcessorError, ProcessorRegistry
from server.domain.enums import TaskType


def _reference(value: dict[str, Any] | None, ctx: ProcessorContext) -> ReferenceSet | None:
    if value is None:
        return None
    try:
        images = tuple(ctx.resolve(uri) for uri in value.get("images", []))
    except FileNotFoundError as exc:
        raise ProcessorError("validation", f"reference image missing: {exc}") from exc
    return ReferenceSet(name=str(value["name"]), images=images, weight=float(value["weight"]))


def run_generation(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """GENERATION: a studio composite of the catalog references at the asked size and seed."""
    spec = GenerationInput(
        width=int(params["width"]),
        height=int(params["height"]),
        seed=int(params["seed"]),
        steps=int(params["steps"]),
        prompt=str(params["prompt"]),
        negative_prompt=str(params.get("negative_prompt", "")),
        shot_type=str(params["shot_type"]),
        subject=_reference(params.get("subject"), ctx),
        product=_reference(params.get("product"), ctx),
        style=_reference(params.get("style"), ctx),
    )
    image = render_generation(spec, ctx.progress, max_input_pixels=ctx.max_input_pixels)
    return [OutputFile(image.data, image.mime_type, image.width, image.height, spec.seed)]


def default_registry() -> ProcessorRegistry:
    """Every processor the local backend ships."""
    return ProcessorRegistry({TaskType.GENERATION: run_generation})
