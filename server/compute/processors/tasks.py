"""Adapters from the compute wire parameters to each CPU processor, and the default registry."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from server.compute.base import OutputFile
from server.compute.processors.adjust import MAX_GAMMA, MIN_GAMMA, Adjustment, adjust_image
from server.compute.processors.background import MAX_EXPANSION, BackgroundSpec, fix_background
from server.compute.processors.editing import (
    EditingInput,
    Entity,
    enhance_detail,
    prompt_only_hints,
    render_edit,
)
from server.compute.processors.face import detect_faces, enhance_faces
from server.compute.processors.generation import (
    GenerationInput,
    ReferenceSet,
    render_generation,
)
from server.compute.processors.imaging import decode_input, encode_png
from server.compute.processors.refine import RefineInput, refine_image
from server.compute.processors.video import VideoInput, render_video
from server.compute.registry import ProcessorContext, ProcessorError, ProcessorRegistry
from server.domain.enums import TaskType
from server.domain.sizes import MAX_SIDE, refine_output_size

NO_FACE_NOTE = "no face detected; the image is unchanged"
MAX_REFERENCE_IMAGES = 8
# The task types whose processors ignore the seed: the same parameters and inputs give the
# same bytes whatever the seed. The AGENTIC loop does not run such a chain again for a new
# seed alone. The compute server runs these same processors (tests/compute checks the
# claim on both backends); a compute server whose processors broke it would cost at most
# a byte-identical attempt, which the loop recognises and does not count as a candidate.
SEED_FREE = frozenset(
    {TaskType.DETAIL_ENHANCER, TaskType.REFINE, TaskType.IMAGE_ADJUSTER, TaskType.FACE_ENHANCER}
)


def _reference(value: dict[str, Any] | None, ctx: ProcessorContext) -> ReferenceSet | None:
    if value is None:
        return None
    try:
        images = tuple(ctx.resolve(uri) for uri in value.get("images", []))
    except FileNotFoundError as exc:
        raise ProcessorError("validation", f"reference image missing: {exc}") from exc
    return ReferenceSet(name=str(value["name"]), images=images, weight=float(value["weight"]))


def _resolve(uri: Any, ctx: ProcessorContext, what: str) -> bytes:
    if not isinstance(uri, str) or not uri:
        raise ProcessorError("validation", f"{what} must be an image reference")
    try:
        return ctx.resolve(uri)
    except FileNotFoundError as exc:
        raise ProcessorError("validation", f"{what} missing: {exc}") from exc


def _image(uri: Any, ctx: ProcessorContext, what: str = "base_image") -> Image.Image:
    """Resolve and decode one input image (PNG, JPEG, WebP or an MP4's first frame)."""
    return decode_input(_resolve(uri, ctx, what), ctx.max_input_pixels)


def _number(params: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    """A finite float parameter within [lo, hi]; absent or None means ``default``."""
    raw = params.get(key)
    try:
        value = default if raw is None else float(raw)
    except (TypeError, ValueError):
        raise ProcessorError("validation", f"{key} must be a number") from None
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ProcessorError("validation", f"{key} must be within {lo:g}..{hi:g}, got {raw!r}")
    return value


def _integer(params: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    """An integer parameter within [lo, hi]; absent or None means ``default``."""
    value = _number(params, key, default, lo, hi)
    if value != int(value):
        raise ProcessorError("validation", f"{key} must be an integer, got {value!r}")
    return int(value)


def _seed(params: dict[str, Any]) -> int:
    seed = params.get("seed")
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ProcessorError("validation", f"seed must be an integer, got {seed!r}")
    return seed


def _png(img: Image.Image, seed: int, notes: tuple[str, ...] = ()) -> list[OutputFile]:
    return [OutputFile(encode_png(img), "image/png", img.width, img.height, seed, notes=notes)]


def _entity(value: Any, ctx: ProcessorContext, role: str) -> Entity | None:
    """A subject/product of EDITING: its first reference image decoded, if it has one."""
    if value is None:
        return None
    if not isinstance(value, dict) or "name" not in value:
        raise ProcessorError("validation", f"{role} must be an object with a name")
    images = value.get("images") or []
    if not isinstance(images, list):
        raise ProcessorError("validation", f"{role}.images must be a list")
    weight = _number(value, "weight", 1.0, 0.0, 2.0)
    first = _image(images[0], ctx, f"{role}.images[0]") if images else None
    return Entity(name=str(value["name"]), image=first, weight=weight)


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


def run_editing(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """EDITING: EDIT, SUBJECT_SWAP or PRODUCT_ENHANCEMENT of the base image, as a PNG."""
    seed = _seed(params)
    refs = params.get("reference_images") or []
    if not isinstance(refs, list) or len(refs) > MAX_REFERENCE_IMAGES:
        raise ProcessorError("validation", f"at most {MAX_REFERENCE_IMAGES} reference_images")
    width = _integer(params, "width", 0, 0, MAX_SIDE)
    height = _integer(params, "height", 0, 0, MAX_SIDE)
    base = _image(params.get("base_image"), ctx)
    ctx.progress(0.05)
    out_w, out_h = width or base.width, height or base.height
    if out_w > MAX_SIDE or out_h > MAX_SIDE or out_w * out_h > ctx.max_input_pixels:
        raise ProcessorError("validation", f"output size {out_w}x{out_h} is too large")
    spec = EditingInput(
        base=base,
        references=tuple(_image(uri, ctx, f"reference_images[{i}]") for i, uri in enumerate(refs)),
        subject=_entity(params.get("subject"), ctx, "subject"),
        product=_entity(params.get("product"), ctx, "product"),
        tool=str(params.get("tool", "")),
        width=width,
        height=height,
        seed=seed,
        prompt=str(params.get("prompt", "")),
    )
    ctx.progress(0.1)
    image = render_edit(spec, ctx.progress)
    ctx.progress(0.95)
    notes: tuple[str, ...] = ()
    if spec.tool == "EDIT" and not spec.references:
        applied = ", ".join(prompt_only_hints(spec.prompt))
        notes = (f"no reference images: the edit applied the prompt's colour hints ({applied})",)
    return _png(image, seed, notes)


def run_detail_enhancer(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """DETAIL_ENHANCER: sharpen fine texture (luma unsharp mask), same size as the input."""
    seed = _seed(params)
    strength = _number(params, "strength", 0.5, 0.0, 1.0)
    base = _image(params.get("base_image"), ctx)
    ctx.progress(0.3)
    image = enhance_detail(base, strength)
    ctx.progress(0.9)
    return _png(image, seed)


def run_refine(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """REFINE: staged upscale with denoise/sharpening and face detail, at the derived size."""
    seed = _seed(params)
    target_w = _integer(params, "target_width", 0, 0, 10**6)
    target_h = _integer(params, "target_height", 0, 0, 10**6)
    upscale = bool(params.get("upscale_enabled", False))
    factor = _number(params, "upscale_factor", 0.0, 0.0, 1e6) or 2.0
    base = _image(params.get("base_image"), ctx)
    width, height = refine_output_size(
        base.width,
        base.height,
        target_width=target_w,
        target_height=target_h,
        upscale_enabled=upscale,
        upscale_factor=factor,
    )
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ProcessorError(
            "validation", f"output size {width}x{height} exceeds {MAX_SIDE} pixels a side"
        )
    spec = RefineInput(
        width=width,
        height=height,
        upscale_enabled=upscale,
        upscale_steps=_integer(params, "upscale_steps", 0, 0, 10) or 2,
        upscale_denoise=_number(params, "upscale_denoise", 0.3, 0.0, 1.0),
        face_detail_enabled=bool(params.get("face_detail_enabled", False)),
        face_detail_steps=_integer(params, "face_detail_steps", 0, 0, 50) or 10,
        seed=seed,
    )
    ctx.progress(0.05)
    result = refine_image(base, spec, ctx.progress)
    return _png(result.image, seed, result.notes)


def run_video_generation(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """VIDEO_GENERATION: a seeded camera move over the still, as an H.264 MP4."""
    seed = _seed(params)
    spec = VideoInput(
        motion_bucket_id=_integer(params, "motion_bucket_id", 127, 0, 255) or 127,
        fps=_integer(params, "fps", 24, 0, 60) or 24,
        duration_s=_number(params, "duration_s", 3.0, 0.5, 30.0),
        seed=seed,
    )
    base = _image(params.get("base_image"), ctx)
    ctx.progress(0.05)
    video = render_video(base, spec, ctx.progress)
    return [
        OutputFile(
            video.data,
            "video/mp4",
            video.width,
            video.height,
            seed,
            duration_s=video.duration_s,
            frame_count=video.frame_count,
        )
    ]


def run_background_fix(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """BACKGROUND_FIX: keep the foreground, replace (image or prompt) or clean the background."""
    seed = _seed(params)
    expansion = _integer(params, "mask_expansion", 0, 0, MAX_EXPANSION)
    prompt = str(params.get("background_prompt") or "")
    bg_uri = params.get("background_image") or ""
    base = _image(params.get("base_image"), ctx)
    backdrop = _image(bg_uri, ctx, "background_image") if bg_uri else None
    ctx.progress(0.1)
    spec = BackgroundSpec(prompt=prompt, image=backdrop, mask_expansion=expansion, seed=seed)
    image = fix_background(base, spec, ctx.progress)
    ctx.progress(0.9)
    return _png(image, seed)


def run_image_adjuster(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """IMAGE_ADJUSTER: prompt hints, then brightness, gamma, contrast and saturation."""
    seed = _seed(params)
    values = Adjustment(
        brightness=_number(params, "brightness", 0.0, -1.0, 1.0),
        contrast=_number(params, "contrast", 0.0, -1.0, 1.0),
        saturation=_number(params, "saturation", 0.0, -1.0, 1.0),
        gamma=_number(params, "gamma", 1.0, MIN_GAMMA, MAX_GAMMA),
    )
    base = _image(params.get("base_image"), ctx)
    ctx.progress(0.3)
    image = adjust_image(base, values, str(params.get("prompt") or ""))
    ctx.progress(0.9)
    return _png(image, seed)


def run_face_enhancer(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """FACE_ENHANCER: retouch every detected face; no face leaves the image unchanged."""
    seed = _seed(params)
    strength = _number(params, "strength", 0.5, 0.0, 1.0)
    base = _image(params.get("base_image"), ctx)
    ctx.progress(0.1)
    rgb = np.asarray(base.convert("RGB"), dtype=np.uint8)
    faces = detect_faces(rgb)
    ctx.progress(0.4)
    if not faces:
        return _png(base, seed, (NO_FACE_NOTE,))
    out = Image.fromarray(enhance_faces(rgb, faces, strength, str(params.get("prompt") or "")))
    if base.mode == "RGBA":
        out.putalpha(base.getchannel("A"))
    ctx.progress(0.9)
    return _png(out, seed)


def default_registry() -> ProcessorRegistry:
    """Every processor the local backend ships."""
    return ProcessorRegistry(
        {
            TaskType.GENERATION: run_generation,
            TaskType.EDITING: run_editing,
            TaskType.DETAIL_ENHANCER: run_detail_enhancer,
            TaskType.REFINE: run_refine,
            TaskType.VIDEO_GENERATION: run_video_generation,
            TaskType.BACKGROUND_FIX: run_background_fix,
            TaskType.IMAGE_ADJUSTER: run_image_adjuster,
            TaskType.FACE_ENHANCER: run_face_enhancer,
        }
    )
