"""Deterministic CPU studio-shot renderer for the GENERATION task type."""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from server.compute.processors.imaging import (
    F32,
    LUMA,
    blur,
    decode,
    placeholder,
    segment,
    smoothstep,
    to_f32,
    to_u8,
)
from server.compute.registry import ProcessorError

ProgressFn = Callable[[float], None]
_Box = tuple[slice, slice]
_Entity = tuple[str, Image.Image, float]  # role, cutout, LoRA weight

_MAX_SIDE = 8192
# (framing, role, paired) -> cx, base (bottom edge), height, max width, blur, opacity, contact;
# x and max width are fractions of the frame width, the rest fractions of its height.
_LAYOUT: dict[tuple[str, str, bool], tuple[float, float, float, float, float, float, bool]] = {
    ("full", "subject", False): (0.50, 0.90, 0.80, 0.80, 0.0, 1.0, True),
    ("full", "subject", True): (0.38, 0.90, 0.80, 0.55, 0.0, 1.0, True),
    ("full", "product", False): (0.50, 0.86, 0.62, 0.80, 0.0, 1.0, True),
    ("full", "product", True): (0.74, 0.62, 0.34, 0.38, 0.0, 1.0, False),
    ("half", "subject", False): (0.50, 1.63, 1.56, 3.00, 0.0, 1.0, False),
    ("half", "subject", True): (0.36, 1.63, 1.56, 3.00, 0.0, 1.0, False),
    ("half", "product", False): (0.50, 0.88, 0.74, 0.86, 0.0, 1.0, True),
    ("half", "product", True): (0.74, 0.82, 0.48, 0.44, 0.0, 1.0, False),
    ("close", "subject", False): (0.50, 2.58, 2.50, 3.00, 0.0, 1.0, False),
    ("close", "subject", True): (0.26, 1.85, 1.90, 3.00, 0.012, 0.45, False),
    ("close", "product", False): (0.50, 0.94, 0.88, 0.92, 0.0, 1.0, False),
    ("close", "product", True): (0.54, 0.94, 0.88, 0.88, 0.0, 1.0, False),
}


@dataclass(frozen=True, slots=True)
class ReferenceSet:
    """Reference image bytes for one catalog entity."""

    name: str
    images: tuple[bytes, ...]
    weight: float


@dataclass(frozen=True, slots=True)
class GenerationInput:
    """Everything the renderer needs for one GENERATION task."""

    width: int
    height: int
    seed: int
    steps: int
    prompt: str
    negative_prompt: str
    shot_type: str
    subject: ReferenceSet | None
    product: ReferenceSet | None
    style: ReferenceSet | None


@dataclass(frozen=True, slots=True)
class RenderedImage:
    """An encoded output image."""

    data: bytes
    mime_type: str
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class _Shot:
    framing: str
    mirror: bool
    squeeze: float
    shear: float
    horizon: float


@dataclass(frozen=True, slots=True)
class _Look:
    """Seed/prompt driven variation plus the (style driven) palette."""

    light_x: float
    jitter: tuple[float, float]
    grain: float
    wall: F32
    floor: F32
    tint: F32
    accent: F32
    grade: float


@dataclass(frozen=True, slots=True)
class _Placed:
    rgba: F32
    x0: int
    y0: int
    contact: bool


def render_generation(
    spec: GenerationInput, progress: ProgressFn, *, max_input_pixels: int = 40_000_000
) -> RenderedImage:
    """Render a deterministic studio shot composed from the spec's reference images.

    Args:
        spec: Output size, seed, steps, prompt, shot type and the entity references.
        progress: Called with increasing values in (0, 1]; the last call is 1.0.
        max_input_pixels: Largest accepted pixel count, for the output and each input.

    Returns:
        An RGB PNG of exactly ``spec.width`` x ``spec.height`` pixels.

    Raises:
        ProcessorError: With category "validation" for bad sizes or undecodable input.
    """
    _validate(spec, max_input_pixels)
    shot = _parse_shot(spec.shot_type)
    text = "\0".join((spec.prompt, spec.negative_prompt, spec.shot_type)).encode()
    prompt_hash = int.from_bytes(hashlib.sha256(text).digest()[:8], "big")
    rng = np.random.default_rng([spec.seed % 2**64, prompt_hash])
    work = int(min(1280, max(64, 1.6 * max(spec.width, spec.height))))
    entities = _load_entities(spec, work, max_input_pixels)
    progress(0.15)
    look = _look(spec.style, rng, max_input_pixels)
    progress(0.25)
    canvas = _backdrop(spec.width, spec.height, look, shot.horizon)
    progress(0.35)
    placed = [_prepare(ent, shot, look, spec, len(entities) > 1) for ent in entities]
    progress(0.45)
    _compose(canvas, placed, look)
    image = _refine(_grade(canvas, look), spec.steps, progress)
    grain = rng.standard_normal((spec.height, spec.width, 1), dtype=np.float32) * look.grain
    out = Image.fromarray(to_u8(to_f32(image) + grain))
    buf = io.BytesIO()
    out.save(buf, format="PNG", compress_level=4)
    progress(1.0)
    return RenderedImage(buf.getvalue(), "image/png", spec.width, spec.height)


def _validate(spec: GenerationInput, max_pixels: int) -> None:
    w, h = spec.width, spec.height
    if not (1 <= w <= _MAX_SIDE and 1 <= h <= _MAX_SIDE) or w * h > max_pixels:
        raise ProcessorError("validation", f"unsupported output size {w}x{h}")
    for ref in (spec.subject, spec.product, spec.style):
        if ref is not None and not math.isfinite(ref.weight):
            raise ProcessorError("validation", f"weight of {ref.name!r} is not finite")


def _parse_shot(shot_type: str) -> _Shot:
    words = set(re.findall(r"[a-z0-9]+", shot_type.lower()))
    framing, horizon = "full", 0.66
    if words & {"close", "closeup", "detail", "macro"}:
        framing, horizon = "close", 0.86
    elif words & {"half", "upper", "waist"}:
        framing, horizon = "half", 0.80
    three_quarter = {"three", "quarter"} <= words or "3" in words
    squeeze = 0.8 if words & {"side", "profile"} else (0.92 if three_quarter else 1.0)
    return _Shot(framing, "back" in words, squeeze, 0.035 if three_quarter else 0.0, horizon)


def _load_entities(spec: GenerationInput, work: int, max_pixels: int) -> list[_Entity]:
    entities: list[_Entity] = []
    for role, ref in (("subject", spec.subject), ("product", spec.product)):
        if ref is None:
            continue
        for extra in ref.images[1:]:
            decode(extra, max_pixels, 0)
        if ref.images:
            cutout = segment(decode(ref.images[0], max_pixels, work))
        else:
            cutout = segment(placeholder(role, ref.name, work))
        entities.append((role, cutout, float(np.clip(ref.weight, 0.0, 2.0))))
    if not entities:
        entities.append(("subject", segment(placeholder("subject", spec.prompt, work)), 1.0))
    return entities


def _style_colours(style: ReferenceSet, max_pixels: int) -> tuple[F32, F32, F32]:
    """Mean, dominant and most saturated colour of the style references."""
    thumbs = [decode(b, max_pixels, 64).convert("RGB") for b in style.images]
    pixels = np.concatenate([np.asarray(t).reshape(-1, 3) for t in thumbs])
    strip = Image.fromarray(np.ascontiguousarray(pixels.reshape(1, -1, 3)))
    quant = strip.quantize(colors=4, method=Image.Quantize.MEDIANCUT)
    pal = np.array(quant.getpalette() or [0] * 12, dtype=np.float32).reshape(-1, 3)[:4] / 255.0
    counts = np.bincount(np.asarray(quant).ravel(), minlength=4)[:4]
    sat = pal.max(axis=1) - pal.min(axis=1)
    mean = (pixels.mean(axis=0) / 255.0).astype(np.float32)
    return mean, pal[int(np.argmax(counts))], pal[int(np.argmax(sat))]


def _look(style: ReferenceSet | None, rng: np.random.Generator, max_pixels: int) -> _Look:
    """Draw the seed variation and derive backdrop colours and grading from the style."""
    u = [float(v) for v in rng.uniform(-1.0, 1.0, size=6)]
    hue = np.array([1 - 0.02 * u[1], 1, 1 + 0.02 * u[1]], dtype=np.float32)  # backdrop shift
    tint = np.array([1 + 0.03 * u[5], 1, 1 - 0.03 * u[5]], dtype=np.float32)
    wall = np.array([0.92, 0.92, 0.93], dtype=np.float32) * tint
    floor = np.array([0.80, 0.80, 0.81], dtype=np.float32) * tint
    accent, grade = wall * 0.5, 0.06
    if style is not None and style.images:
        mean, dominant, accent = _style_colours(style, max_pixels)
        k = 0.35 + 0.35 * min(style.weight, 1.0) + 0.15 * max(style.weight - 1.0, 0.0)
        wall = wall + k * ((0.55 * dominant + 0.45 * 0.95) - wall)
        floor = floor + k * ((0.75 * dominant + 0.25 * 0.8) - floor)
        tint = np.clip(mean / max(float(mean @ LUMA), 0.05), 0.7, 1.3).astype(np.float32)
        grade = 0.1 + 0.12 * min(style.weight, 2.0)
    wall, floor = wall * hue, floor * hue
    grain = 0.012 + 0.004 * u[4]
    return _Look(u[0], (u[2], u[3]), grain, wall, floor, tint, accent.astype(np.float32), grade)


def _backdrop(w: int, h: int, look: _Look, hz: float) -> F32:
    """Seamless sweep (wall to floor) lit by a soft spotlight, with a lighting vignette."""
    ys = ((np.arange(h) + 0.5) / h).astype(np.float32)
    xs = ((np.arange(w) + 0.5) / w).astype(np.float32)
    t = smoothstep(hz - 0.22, hz + 0.10, ys)[:, None, None]
    wall = look.wall * (0.86 + 0.14 * np.minimum(ys / hz, 1.0))[:, None, None]
    floor = look.floor * (1.0 - 0.12 * np.clip((ys - hz) / (1.0 - hz), 0.0, 1.0))[:, None, None]
    sweep = wall + t * (floor - wall)
    ax, ay = w / max(w, h), h / max(w, h)
    dx = ((xs - (0.5 + 0.22 * look.light_x)) * ax)[None, :]
    dy = ((ys - 0.38) * ay)[:, None]
    spot = np.exp(-(dx * dx + dy * dy) / (2 * 0.38**2))
    cx, cy = ((xs - 0.5) * 2 * ax)[None, :], ((ys - 0.5) * 2 * ay)[:, None]
    vignette = 1.0 - 0.14 * np.clip(cx * cx + cy * cy, 0.0, 2.0)
    lit: F32 = np.clip(sweep * ((0.8 + 0.28 * spot) * vignette)[..., None], 0.0, 1.0)
    return lit.astype(np.float32)


def _express(rgba: F32, weight: float, opacity: float) -> F32:
    """LoRA weight on premultiplied RGBA: below 1 fade/desaturate, above 1 boost colour."""
    base, over = min(weight, 1.0), max(weight - 1.0, 0.0)
    alpha = rgba[..., 3:4]
    luma = (rgba[..., :3] @ LUMA)[..., None]
    rgb = luma + (rgba[..., :3] - luma) * (0.25 + 0.75 * base + 0.35 * over)
    rgb = (rgb - 0.5 * alpha) * (1.0 + 0.15 * over) + 0.5 * alpha
    fade = (0.3 + 0.7 * base) * opacity
    rgba[..., :3] = np.clip(rgb, 0.0, alpha) * fade
    rgba[..., 3] *= fade
    return rgba


def _prepare(
    ent: _Entity, shot: _Shot, look: _Look, spec: GenerationInput, paired: bool
) -> _Placed:
    """Scale, mirror/skew and weight one cutout and position it for the shot type."""
    role, cutout, weight = ent
    cx, base, height, max_w, softness, opacity, contact = _LAYOUT[(shot.framing, role, paired)]
    w, h = spec.width, spec.height
    scale = 0.85 + 0.15 * min(weight, 1.0) + 0.08 * max(weight - 1.0, 0.0)
    squeeze = shot.squeeze if role == "subject" else 1.0
    k = scale * min(height * h / cutout.height, max_w * w / (cutout.width * squeeze))
    size = (max(1, round(cutout.width * squeeze * k)), max(1, round(cutout.height * k)))
    img = cutout.convert("RGBa")
    if shot.mirror:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    if shot.shear and role == "subject":
        extra = int(shot.shear * size[1])
        data = (1.0, shot.shear, -float(extra), 0.0, 1.0, 0.0)
        img = img.transform((size[0] + extra, size[1]), Image.Transform.AFFINE, data)
    if softness:
        img = img.filter(ImageFilter.GaussianBlur(softness * h))
    rgba = _express(to_f32(img), weight, opacity)  # stays premultiplied
    px = cx * w + look.jitter[0] * 0.03 * w
    py = base * h + look.jitter[1] * 0.015 * h
    return _Placed(rgba, round(px - rgba.shape[1] / 2), round(py - rgba.shape[0]), contact)


def _overlap(p: _Placed, dx: int, dy: int, w: int, h: int) -> tuple[_Box, _Box] | None:
    """Frame and item slices where the item (shifted by dx, dy) covers the frame."""
    x0, y0 = p.x0 + dx, p.y0 + dy
    fx0, fy0 = max(x0, 0), max(y0, 0)
    fx1, fy1 = min(x0 + p.rgba.shape[1], w), min(y0 + p.rgba.shape[0], h)
    if fx1 <= fx0 or fy1 <= fy0:
        return None
    frame = (slice(fy0, fy1), slice(fx0, fx1))
    return frame, (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))


def _shadow_map(h: int, w: int, placed: list[_Placed], light_x: float) -> F32:
    """Soft drop shadows away from the light plus elliptical floor contact shadows."""
    drop = np.zeros((h, w), dtype=np.float32)
    dx, dy = round(-light_x * 0.03 * w), round(0.015 * h)
    contact = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(contact)
    for p in placed:
        box = _overlap(p, dx, dy, w, h)
        if box is not None:
            drop[box[0]] = np.maximum(drop[box[0]], p.rgba[box[1]][..., 3])
        if p.contact:
            pw, foot = p.rgba.shape[1], p.y0 + p.rgba.shape[0]
            cx, ry = p.x0 + pw / 2 + dx * 0.5, max(1.0, 0.022 * h)
            draw.ellipse([cx - 0.42 * pw, foot - ry, cx + 0.42 * pw, foot + ry], fill=255)
    soft = max(0.5, 0.012 * min(w, h))
    floor = to_f32(contact.filter(ImageFilter.GaussianBlur(soft)))
    return np.clip(0.32 * blur(drop, 1.6 * soft) + 0.5 * floor, 0.0, 0.8).astype(np.float32)


def _compose(canvas: F32, placed: list[_Placed], look: _Look) -> None:
    h, w = canvas.shape[:2]
    canvas *= 1.0 - _shadow_map(h, w, placed, look.light_x)[..., None]
    for p in placed:
        box = _overlap(p, 0, 0, w, h)
        if box is not None:
            src = p.rgba[box[1]]
            alpha = src[..., 3:4]
            canvas[box[0]] = canvas[box[0]] * (1.0 - alpha) + src[..., :3]


def _grade(canvas: F32, look: _Look) -> F32:
    """Tint towards the style's mean colour and push shadows towards its accent colour."""
    shadows = (1.0 - (canvas @ LUMA)[..., None]) ** 2
    toned = (canvas * look.tint - canvas) + 0.5 * shadows * (look.accent - canvas)
    return np.clip(canvas + look.grade * toned, 0.0, 1.0).astype(np.float32)


def _refine(canvas: F32, steps: int, progress: ProgressFn) -> Image.Image:
    """Run min(steps, 10) light sharpening passes whose total strength is step independent."""
    img = Image.fromarray(to_u8(canvas))
    passes = max(1, min(int(steps), 10))
    a = 0.1 / passes
    kernel = ImageFilter.Kernel((3, 3), [0, -a, 0, -a, 1 + 4 * a, -a, 0, -a, 0], scale=1)
    for i in range(passes):
        img = img.filter(kernel)
        progress(0.45 + 0.5 * (i + 1) / passes)
    return img
