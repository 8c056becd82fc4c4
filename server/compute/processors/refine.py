"""REFINE on the CPU: staged Lanczos upscaling with denoise and sharpening, and face detail.

With upscaling enabled the image grows to the output size in ``upscale_steps`` geometric
stages; each stage is a Lanczos resize, then an edge-preserving (bilateral) denoise mixed
in by ``upscale_denoise`` (0 skips it) and a mild unsharp mask. Without upscaling the
image is resized once to the output size (when it differs). The face pass then retouches
every detected face in ``face_detail_steps`` gentle iterations (see ``face.face_detail``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from server.compute.processors.face import detect_faces, face_detail
from server.compute.processors.imaging import U8
from server.compute.registry import ProcessorError

ProgressFn = Callable[[float], None]

MAX_UPSCALE_STEPS = 10
MAX_FACE_STEPS = 50
NO_FACE_NOTE = "no face detected; face detail skipped"
_SHARPEN = 0.25  # unsharp mask amount (sigma 1 px) after each upscale stage


@dataclass(frozen=True, slots=True)
class RefineInput:
    """One REFINE task: the output size (already derived) and the pass settings."""

    width: int
    height: int
    upscale_enabled: bool
    upscale_steps: int
    upscale_denoise: float
    face_detail_enabled: bool
    face_detail_steps: int
    seed: int


@dataclass(frozen=True, slots=True)
class RefineResult:
    """The refined image and findings worth reporting."""

    image: Image.Image
    notes: tuple[str, ...]


def stage_sizes(src: tuple[int, int], dst: tuple[int, int], steps: int) -> list[tuple[int, int]]:
    """Sizes after each of ``steps`` geometric stages from ``src`` to exactly ``dst``."""
    sizes = []
    for i in range(1, steps + 1):
        t = i / steps
        w = round(src[0] * (dst[0] / src[0]) ** t)
        h = round(src[1] * (dst[1] / src[1]) ** t)
        sizes.append((max(1, w), max(1, h)))
    sizes[-1] = dst
    return sizes


def refine_image(img: Image.Image, spec: RefineInput, progress: ProgressFn) -> RefineResult:
    """Upscale and/or retouch faces, producing exactly ``spec.width`` x ``spec.height``.

    Args:
        img: An RGB or RGBA image.
        spec: Output size and pass settings.
        progress: Called after every stage and face iteration with increasing values below 1.

    Returns:
        The refined image (RGBA when the input had alpha) and notes.

    Raises:
        ProcessorError: With category "validation" for out-of-range settings.
    """
    _validate(spec)
    size = (spec.width, spec.height)
    rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    alpha = img.getchannel("A") if img.mode == "RGBA" else None
    face_share = 0.45 if spec.face_detail_enabled else 0.0
    start, resize_share = 0.05, 0.9 - face_share
    if spec.upscale_enabled:
        stages = stage_sizes(img.size, size, spec.upscale_steps)
        for i, stage in enumerate(stages):
            rgb = _upscale_stage(rgb, stage, spec.upscale_denoise)
            progress(start + resize_share * (i + 1) / len(stages))
    elif img.size != size:
        rgb = _resize(rgb, size)
        progress(start + resize_share)
    notes: tuple[str, ...] = ()
    if spec.face_detail_enabled:
        faces = detect_faces(rgb)
        start += resize_share
        if faces:
            steps = spec.face_detail_steps

            def on_step(done: int) -> None:
                progress(start + face_share * done / steps)

            rgb = face_detail(rgb, faces, steps, on_step)
        else:
            notes = (NO_FACE_NOTE,)
    out = Image.fromarray(rgb)
    if alpha is not None:
        out.putalpha(alpha.resize(size, Image.Resampling.LANCZOS))
    return RefineResult(out, notes)


def _validate(spec: RefineInput) -> None:
    if spec.width < 1 or spec.height < 1:
        raise ProcessorError("validation", f"impossible output size {spec.width}x{spec.height}")
    if spec.upscale_enabled and not 1 <= spec.upscale_steps <= MAX_UPSCALE_STEPS:
        raise ProcessorError("validation", f"upscale_steps must be 1-{MAX_UPSCALE_STEPS}")
    if not 0.0 <= spec.upscale_denoise <= 1.0:
        raise ProcessorError("validation", "upscale_denoise must be 0-1")
    if spec.face_detail_enabled and not 1 <= spec.face_detail_steps <= MAX_FACE_STEPS:
        raise ProcessorError("validation", f"face_detail_steps must be 1-{MAX_FACE_STEPS}")


def _resize(rgb: U8, size: tuple[int, int]) -> U8:
    out = Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(out, dtype=np.uint8)


def _upscale_stage(rgb: U8, size: tuple[int, int], denoise: float) -> U8:
    """One stage: Lanczos resize, bilateral denoise mixed in by ``denoise``, mild sharpening.

    Works on 8-bit pixels with OpenCV throughout: the stages reach 16 megapixels.
    """
    out = _resize(rgb, size)
    if denoise > 0.0:
        smoothed = cv2.bilateralFilter(out, 5, 8.0 + 30.0 * denoise, 1.0 + 1.5 * denoise)
        out = np.asarray(cv2.addWeighted(out, 1.0 - denoise, smoothed, denoise, 0.0), np.uint8)
    blurred = cv2.GaussianBlur(out, (0, 0), 1.0)
    return np.asarray(cv2.addWeighted(out, 1.0 + _SHARPEN, blurred, -_SHARPEN, 0.0), np.uint8)
