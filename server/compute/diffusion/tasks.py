"""What each task type does on a diffusion model (imports torch: workers only).

Every function takes the model's name and entry, the task's wire parameters, the
processor context and the worker's runtime, and returns the outputs; each output's
``recipe`` records what the parameters do not say: the model, its pipeline and scheduler,
the steps, guidance and denoising strength used, and the LoRAs with their weights.

- GENERATION: text to image at the asked size; with a product (else subject) reference
  image, image to image from it at ``REFERENCE_STRENGTH``. The subject, product and
  style LoRAs are applied with their weights.
- EDITING: image to image of the base at ``EDIT_STRENGTH`` with the prompt.
- DETAIL_ENHANCER: image to image at a low strength (``strength`` x ``DETAIL_MAX``).
- REFINE: staged upscale: each stage resizes a step of the way to the output size, then
  runs image to image at ``upscale_denoise``.
- BACKGROUND_FIX: inpainting of everything outside the foreground mask (the CPU
  processor's segmentation, grown by ``mask_expansion``); the foreground is kept as is.
- FACE_ENHANCER: inpainting of each detected face (the CPU processor's detector) at
  ``strength``; outside the faces the image is kept as is; no face: unchanged, with a
  note.
- VIDEO_GENERATION: image to video from the base, ``fps`` x ``duration_s`` frames at
  ``motion_bucket_id`` and ``fps``, encoded as H.264 MP4.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from server.compute.base import OutputFile
from server.compute.diffusion.models import Model
from server.compute.diffusion.runtime import (
    Lora,
    Runtime,
    device_of,
    generator,
    png_bytes,
    run,
    step_reporter,
)
from server.compute.processors.background import cover, foreground_mask, grow_mask
from server.compute.processors.face import detect_faces, face_mask, face_region
from server.compute.processors.imaging import to_f32, to_u8
from server.compute.processors.tasks import (
    NO_FACE_NOTE,
    _image,
    _integer,
    _number,
    _resolve,
    _seed,
)
from server.compute.processors.video import encode_mp4, frame_count
from server.compute.registry import ProcessorContext, ProcessorError
from server.domain.enums import TaskType
from server.domain.sizes import MAX_SIDE, refine_output_size

REFERENCE_STRENGTH = 0.75
EDIT_STRENGTH = 0.6
DETAIL_MAX = 0.3
MAX_VIDEO_SIDE = 1024
_MULTIPLE = 8  # latent sizes: every side a multiple of this

Task = Callable[[str, Model, dict[str, Any], ProcessorContext, Runtime], list[OutputFile]]


def _steps_for(steps: int, strength: float) -> int:
    """Steps such that at least one denoises: image to image runs ``steps x strength``."""
    return max(steps, math.ceil(1 / strength)) if strength > 0 else steps


def _fit(side: int) -> int:
    """The nearest side the pipelines accept (a multiple of 8, at least 8)."""
    return max(_MULTIPLE, round(side / _MULTIPLE) * _MULTIPLE)


def _exact(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` at exactly the asked size (pipelines work in multiples of 8)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _recipe(name: str, model: Model, pipe: Any, **used: Any) -> dict[str, Any]:
    return {
        "provider": "diffusion",
        "model": name,
        "pipeline": type(pipe).__name__,
        "scheduler": type(pipe.scheduler).__name__,
        **used,
    }


def _png(
    image: Image.Image, seed: int, recipe: dict[str, Any], notes: tuple[str, ...] = ()
) -> list[OutputFile]:
    data = png_bytes(image)
    return [
        OutputFile(data, "image/png", image.width, image.height, seed, notes=notes, recipe=recipe)
    ]


def _denoise(
    name: str,
    model: Model,
    ctx: ProcessorContext,
    rt: Runtime,
    *,
    kind: str,
    steps: int,
    strength: float,
    seed: int,
    span: tuple[float, float],
    loras: tuple[Lora, ...] = (),
    used_loras: tuple[dict[str, Any], ...] = (),
    **arguments: Any,
) -> tuple[Image.Image, dict[str, Any]]:
    """One pass of ``model``'s ``kind`` pipeline; its image and recipe.

    ``strength`` below 1 (image to image, inpainting) denoises that share of the steps,
    and the steps are raised so that at least one does.
    """
    pipe = rt.pipeline(name, model, kind)
    rt.use_loras(name, list(loras))
    if kind != "base":
        steps = _steps_for(steps, strength)
        arguments["strength"] = strength
    out = run(
        pipe,
        device_of(model),
        num_inference_steps=steps,
        guidance_scale=model.guidance,
        generator=generator(seed),
        callback_on_step_end=step_reporter(ctx, max(1, int(steps * strength)), *span),
        **arguments,
    ).images[0]
    used = {
        "steps": steps,
        "guidance_scale": model.guidance,
        "strength": strength,
        "loras": list(used_loras),
    }
    return out, _recipe(name, model, pipe, **used)


def _img2img(
    name: str,
    model: Model,
    ctx: ProcessorContext,
    rt: Runtime,
    *,
    image: Image.Image,
    prompt: str,
    strength: float,
    seed: int,
    span: tuple[float, float] = (0.05, 0.9),
) -> tuple[Image.Image, dict[str, Any]]:
    """One image-to-image pass over ``image`` (its size a multiple of 8)."""
    return _denoise(
        name,
        model,
        ctx,
        rt,
        kind="img2img",
        steps=model.steps,
        strength=strength,
        seed=seed,
        span=span,
        prompt=prompt,
        image=image,
    )


def _base(params: dict[str, Any], ctx: ProcessorContext) -> Image.Image:
    return _image(params.get("base_image"), ctx).convert("RGB")


def generation(
    name: str, model: Model, params: dict[str, Any], ctx: ProcessorContext, rt: Runtime
) -> list[OutputFile]:
    """GENERATION: text (or reference image) to image, with the entities' LoRAs."""
    seed = _seed(params)
    width = _integer(params, "width", 1024, 8, MAX_SIDE)
    height = _integer(params, "height", 1024, 8, MAX_SIDE)
    steps = _integer(params, "steps", model.steps, 1, 150)
    entities = [(role, params.get(role)) for role in ("subject", "product", "style")]
    loras, used_loras = [], []
    for role, entity in entities:
        if isinstance(entity, dict) and entity.get("lora_uri"):
            weight = _number(entity, "weight", 1.0, 0.0, 2.0)
            data = _resolve(entity["lora_uri"], ctx, f"{role}.lora_uri")
            loras.append(Lora(data, weight))
            digest = hashlib.sha256(data).hexdigest()
            used_loras.append({"role": role, "sha256": digest, "weight": weight})
    reference = None
    for role in ("product", "subject"):
        entity = params.get(role)
        if isinstance(entity, dict) and entity.get("images"):
            reference = _image(entity["images"][0], ctx, f"{role}.images[0]").convert("RGB")
            break
    size = (_fit(width), _fit(height))
    inputs: dict[str, Any]
    if reference is None:
        kind, strength, inputs = "base", 1.0, {"width": size[0], "height": size[1]}
    else:
        kind, strength = "img2img", REFERENCE_STRENGTH
        inputs = {"image": Image.fromarray(to_u8(cover(reference, *size)), "RGB")}
    image, recipe = _denoise(
        name,
        model,
        ctx,
        rt,
        kind=kind,
        steps=steps,
        strength=strength,
        seed=seed,
        span=(0.05, 0.9),
        loras=tuple(loras),
        used_loras=tuple(used_loras),
        prompt=str(params.get("prompt") or ""),
        negative_prompt=str(params.get("negative_prompt") or "") or None,
        **inputs,
    )
    return _png(_exact(image, width, height), seed, recipe)


def editing(
    name: str, model: Model, params: dict[str, Any], ctx: ProcessorContext, rt: Runtime
) -> list[OutputFile]:
    """EDITING: image to image of the base with the prompt."""
    seed = _seed(params)
    base = _base(params, ctx)
    width = _integer(params, "width", 0, 0, MAX_SIDE) or base.width
    height = _integer(params, "height", 0, 0, MAX_SIDE) or base.height
    notes: tuple[str, ...] = ()
    if params.get("reference_images"):
        notes = ("the diffusion edit follows the prompt; its reference images are not used",)
    image, recipe = _img2img(
        name,
        model,
        ctx,
        rt,
        image=base.resize((_fit(width), _fit(height)), Image.Resampling.LANCZOS),
        prompt=str(params.get("prompt") or ""),
        strength=EDIT_STRENGTH,
        seed=seed,
    )
    return _png(_exact(image, width, height), seed, recipe, notes)


def detail_enhancer(
    name: str, model: Model, params: dict[str, Any], ctx: ProcessorContext, rt: Runtime
) -> list[OutputFile]:
    """DETAIL_ENHANCER: a low-strength image to image pass at the base's size."""
    seed = _seed(params)
    strength = _number(params, "strength", 0.5, 0.0, 1.0)
    base = _base(params, ctx)
    if strength == 0:
        return _png(base, seed, {"provider": "diffusion", "model": name, "strength": 0.0})
    image, recipe = _img2img(
        name,
        model,
        ctx,
        rt,
        image=base.resize((_fit(base.width), _fit(base.height)), Image.Resampling.LANCZOS),
        prompt=str(params.get("prompt") or ""),
        strength=max(0.05, DETAIL_MAX * strength),
        seed=seed,
    )
    return _png(_exact(image, base.width, base.height), seed, recipe)


def refine(
    name: str, model: Model, params: dict[str, Any], ctx: ProcessorContext, rt: Runtime
) -> list[OutputFile]:
    """REFINE: resize a stage at a time towards the output size, image to image each."""
    seed = _seed(params)
    base = _base(params, ctx)
    upscale = bool(params.get("upscale_enabled", False))
    width, height = refine_output_size(
        base.width,
        base.height,
        target_width=_integer(params, "target_width", 0, 0, 10**6),
        target_height=_integer(params, "target_height", 0, 0, 10**6),
        upscale_enabled=upscale,
        upscale_factor=_number(params, "upscale_factor", 0.0, 0.0, 1e6) or 2.0,
    )
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise ProcessorError(
            "validation", f"output size {width}x{height} exceeds {MAX_SIDE} pixels a side"
        )
    stages = (_integer(params, "upscale_steps", 0, 0, 10) or 2) if upscale else 1
    denoise = _number(params, "upscale_denoise", 0.3, 0.0, 1.0)
    image, recipe = base, {"provider": "diffusion", "model": name, "strength": 0.0}
    for stage in range(1, stages + 1):
        share = stage / stages
        w = base.width * (width / base.width) ** share
        h = base.height * (height / base.height) ** share
        image = image.resize((_fit(round(w)), _fit(round(h))), Image.Resampling.LANCZOS)
        if denoise > 0:
            span = (0.05 + 0.9 * (stage - 1) / stages, 0.9 / stages)
            image, recipe = _img2img(
                name, model, ctx, rt, image=image, prompt="", strength=denoise, seed=seed, span=span
            )
    recipe["stages"] = stages
    return _png(_exact(image, width, height), seed, recipe)


def _inpaint(
    name: str,
    model: Model,
    ctx: ProcessorContext,
    rt: Runtime,
    *,
    image: Image.Image,
    keep: np.ndarray[Any, np.dtype[np.float32]],
    prompt: str,
    strength: float,
    seed: int,
) -> tuple[Image.Image, dict[str, Any]]:
    """Inpaint where ``keep`` is below 1; where it is 1 the pixels stay as they were."""
    size = (_fit(image.width), _fit(image.height))
    mask = Image.fromarray(np.round((1.0 - keep) * 255).astype(np.uint8), "L")
    painted, recipe = _denoise(
        name,
        model,
        ctx,
        rt,
        kind="inpaint",
        steps=model.steps,
        strength=strength,
        seed=seed,
        span=(0.1, 0.8),
        prompt=prompt,
        image=image.resize(size, Image.Resampling.LANCZOS),
        mask_image=mask.resize(size, Image.Resampling.BILINEAR),
        width=size[0],
        height=size[1],
    )
    painted_f = to_f32(_exact(painted, image.width, image.height))
    alpha = keep[..., None]
    out = alpha * to_f32(image) + (1.0 - alpha) * painted_f
    merged = Image.fromarray(np.clip(np.round(out * 255), 0, 255).astype(np.uint8), "RGB")
    return merged, recipe


def background_fix(
    name: str, model: Model, params: dict[str, Any], ctx: ProcessorContext, rt: Runtime
) -> list[OutputFile]:
    """BACKGROUND_FIX: inpaint outside the (grown) foreground mask."""
    seed = _seed(params)
    expansion = _integer(params, "mask_expansion", 0, 0, 64)
    base = _base(params, ctx)
    rgb = to_f32(base)
    alpha = foreground_mask(rgb, seed)
    if expansion:
        alpha = grow_mask(alpha, expansion)
    ctx.progress(0.1)
    start = base
    backdrop_uri = params.get("background_image") or ""
    strength = 1.0
    if backdrop_uri:
        backdrop = cover(_image(backdrop_uri, ctx, "background_image"), base.width, base.height)
        mixed = alpha[..., None] * rgb + (1.0 - alpha[..., None]) * backdrop
        start = Image.fromarray(np.clip(np.round(mixed * 255), 0, 255).astype(np.uint8), "RGB")
        strength = 0.5  # the given backdrop, harmonised
    prompt = str(params.get("background_prompt") or "") or "a clean studio background"
    image, recipe = _inpaint(
        name, model, ctx, rt, image=start, keep=alpha, prompt=prompt, strength=strength, seed=seed
    )
    return _png(image, seed, recipe)


def face_enhancer(
    name: str, model: Model, params: dict[str, Any], ctx: ProcessorContext, rt: Runtime
) -> list[OutputFile]:
    """FACE_ENHANCER: inpaint each detected face at ``strength``."""
    seed = _seed(params)
    strength = _number(params, "strength", 0.5, 0.0, 1.0)
    base = _base(params, ctx)
    rgb = np.asarray(base, dtype=np.uint8)
    faces = detect_faces(rgb)
    ctx.progress(0.1)
    if not faces or strength == 0:
        note = (NO_FACE_NOTE,) if not faces else ()
        return _png(base, seed, {"provider": "diffusion", "model": name, "strength": 0.0}, note)
    h, w = rgb.shape[:2]
    change = np.zeros((h, w), np.float32)
    for box in faces:
        rows, cols = face_region(box, h, w)
        change[rows, cols] = np.maximum(change[rows, cols], face_mask(box, rows, cols))
    prompt = str(params.get("prompt") or "") or "a detailed natural face"
    image, recipe = _inpaint(
        name,
        model,
        ctx,
        rt,
        image=base,
        keep=1.0 - change,
        prompt=prompt,
        strength=strength,
        seed=seed,
    )
    return _png(image, seed, recipe)


def video_generation(
    name: str, model: Model, params: dict[str, Any], ctx: ProcessorContext, rt: Runtime
) -> list[OutputFile]:
    """VIDEO_GENERATION: image to video, fps x duration frames, as H.264 MP4."""
    seed = _seed(params)
    motion = _integer(params, "motion_bucket_id", 127, 0, 255) or 127
    fps = _integer(params, "fps", 24, 0, 60) or 24
    duration = _number(params, "duration_s", 3.0, 0.5, 30.0)
    base = _base(params, ctx)
    scale = min(1.0, MAX_VIDEO_SIDE / max(base.width, base.height))
    width, height = _fit(round(base.width * scale)), _fit(round(base.height * scale))
    frames = frame_count(fps, duration)
    pipe = rt.pipeline(name, model, "base")
    steps = model.steps
    result = run(
        pipe,
        device_of(model),
        image=base.resize((width, height), Image.Resampling.LANCZOS),
        width=width,
        height=height,
        num_frames=frames,
        num_inference_steps=steps,
        fps=fps,
        motion_bucket_id=motion,
        min_guidance_scale=1.0,
        max_guidance_scale=model.guidance,
        decode_chunk_size=min(8, frames),
        generator=generator(seed),
        output_type="np",
        callback_on_step_end=step_reporter(ctx, steps, 0.05, 0.8),
    ).frames[0]
    pixels = [np.clip(np.round(frame * 255), 0, 255).astype(np.uint8) for frame in result]
    data = encode_mp4(pixels, width, height, fps)
    ctx.progress(0.97)
    recipe = _recipe(
        name,
        model,
        pipe,
        steps=steps,
        guidance_scale=model.guidance,
        motion_bucket_id=motion,
        fps=fps,
        frames=frames,
    )
    return [
        OutputFile(
            data,
            "video/mp4",
            width,
            height,
            seed,
            duration_s=frames / fps,
            frame_count=frames,
            recipe=recipe,
        )
    ]


TASKS: dict[TaskType, Task] = {
    TaskType.GENERATION: generation,
    TaskType.EDITING: editing,
    TaskType.DETAIL_ENHANCER: detail_enhancer,
    TaskType.REFINE: refine,
    TaskType.BACKGROUND_FIX: background_fix,
    TaskType.FACE_ENHANCER: face_enhancer,
    TaskType.VIDEO_GENERATION: video_generation,
}
