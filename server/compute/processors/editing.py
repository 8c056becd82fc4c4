"""EDITING (EDIT, SUBJECT_SWAP, PRODUCT_ENHANCEMENT) and DETAIL_ENHANCER on the CPU.

* EDIT applies the prompt's colour hints (see ``adjust.parse_hints``) to the base image,
  then composites each reference image's cut-out onto it, scaled and placed
  deterministically (by seed) where the base has the least foreground and no earlier
  reference; position words in the prompt (left, right, top, bottom, centre) bias where.
  Without reference images the edit is the prompt's colour hints alone; a prompt with
  none of them fails as "unsupported" (there is no generative model here to follow
  free text), rather than completing with the image unchanged.
* SUBJECT_SWAP fills the base's person (its segmented foreground) with a smooth fit of
  the surrounding background and puts the subject's cut-out in its place, fitted to the
  person's box (height first) and standing on the same baseline. (The subject's LoRA
  weight has no CPU counterpart here and is only validated.)
* PRODUCT_ENHANCEMENT sharpens and lifts contrast and saturation on the product region:
  the foreground pixels near the product reference's dominant colour when they exist,
  else the whole foreground. The product's weight (0-2) scales the effect (1 = as
  designed). Everything outside the region keeps its exact values.

The result is then scaled to cover and centre-cropped to the asked size.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

from server.compute.processors.adjust import apply_adjustment, hint_phrases, parse_hints
from server.compute.processors.background import foreground_mask, smooth_background
from server.compute.processors.imaging import (
    F32,
    LUMA,
    gaussian,
    placeholder,
    segment,
    smoothstep,
    split_alpha,
    to_f32,
    to_u8,
    unsharp_luma,
)
from server.compute.registry import ProcessorError

ProgressFn = Callable[[float], None]

TOOLS = ("EDIT", "SUBJECT_SWAP", "PRODUCT_ENHANCEMENT")
_GRID = 24  # candidate positions per side when placing a reference
_SHRINK = (1.0, 0.85, 0.7, 0.55)  # sizes tried, largest first, until a free enough spot
_FREE_ENOUGH = 0.02  # a spot overlapping the foreground this little (fraction) is free
_MIN_REGION = 0.002  # a colour-matched product region below this image fraction is ignored


@dataclass(frozen=True, slots=True)
class Entity:
    """A catalog subject or product: its first reference image (None: a placeholder)."""

    name: str
    image: Image.Image | None
    weight: float


@dataclass(frozen=True, slots=True)
class EditingInput:
    """Everything one EDITING task needs, decoded."""

    base: Image.Image
    references: tuple[Image.Image, ...]
    subject: Entity | None
    product: Entity | None
    tool: str
    width: int
    height: int
    seed: int
    prompt: str


def render_edit(spec: EditingInput, progress: ProgressFn) -> Image.Image:
    """Run the editing tool on the base image and fit the result to the asked size.

    Args:
        spec: The decoded inputs; ``width``/``height`` 0 mean the base image's size.
        progress: Called between steps with increasing values below 1.

    Returns:
        An RGB image, or RGBA when the result keeps transparency.

    Raises:
        ProcessorError: With category "validation" for an unknown tool or SUBJECT_SWAP
            without a subject.
    """
    if spec.tool not in TOOLS:
        raise ProcessorError("validation", f"unknown editing tool {spec.tool!r}")
    if spec.tool == "SUBJECT_SWAP" and spec.subject is None:
        raise ProcessorError("validation", "SUBJECT_SWAP needs a subject")
    if spec.tool == "EDIT" and not spec.references:
        prompt_only_hints(spec.prompt)  # refuses a prompt-only edit it cannot do
    rgb, alpha = split_alpha(spec.base)
    h, w = rgb.shape[:2]
    canvas = np.concatenate(
        [rgb, np.ones((h, w, 1), np.float32) if alpha is None else alpha[..., None]], axis=-1
    )
    fg = _foreground(canvas, spec.seed)
    progress(0.3)
    if spec.tool == "EDIT":
        canvas[..., :3] = apply_adjustment(canvas[..., :3], parse_hints(spec.prompt))
        _edit(canvas, fg, spec, progress)
    elif spec.subject is not None:  # SUBJECT_SWAP
        _swap(canvas, fg, spec.subject)
    else:  # PRODUCT_ENHANCEMENT
        _enhance_product(canvas, fg, spec.product)
    progress(0.85)
    out_w, out_h = spec.width or w, spec.height or h
    keep_alpha = float(canvas[..., 3].min()) < 1.0
    img = Image.fromarray(to_u8(canvas if keep_alpha else canvas[..., :3]))
    return fit_cover(img, out_w, out_h)


def prompt_only_hints(prompt: str) -> list[str]:
    """The colour hints an EDIT without reference images applies: the whole edit.

    Raises:
        ProcessorError: "validation" when the prompt is empty too (nothing asked);
            "unsupported" when it names none of the hints ``adjust.parse_hints`` knows.
    """
    if not prompt.strip():
        raise ProcessorError("validation", "EDIT needs reference images, a prompt, or both")
    hints = hint_phrases(prompt)
    if not hints:
        raise ProcessorError(
            "unsupported",
            "the local EDIT follows a prompt without reference images only through its "
            "colour hints (warmer, cooler, brighter, darker, more/less contrast, "
            "more/less saturated, vivid, muted); this prompt has none",
        )
    return hints


def fit_cover(img: Image.Image, w: int, h: int) -> Image.Image:
    """Scale to cover w x h (Lanczos) and crop the centre; unchanged when already that size."""
    if img.size == (w, h):
        return img
    k = max(w / img.width, h / img.height)
    x0, y0 = (img.width * k - w) / 2, (img.height * k - h) / 2
    box = (x0 / k, y0 / k, (x0 + w) / k, (y0 + h) / k)
    return img.resize((w, h), Image.Resampling.LANCZOS, box=box)


def _foreground(canvas: F32, seed: int) -> F32:
    alpha = canvas[..., 3]
    if float(alpha.min()) < 0.9:
        return alpha.copy()
    return foreground_mask(np.ascontiguousarray(canvas[..., :3]), seed)


def _cutout(img: Image.Image, work: int) -> F32:
    """Segmented, cropped RGBA float cut-out, at most ``work`` pixels on its longer side."""
    rgba = img.convert("RGBA")
    rgba.thumbnail((work, work), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return to_f32(segment(rgba))


def _resize_rgba(rgba: F32, size: tuple[int, int]) -> F32:
    """Resize premultiplied, so no dark fringes appear where alpha fades."""
    premul = rgba.copy()
    premul[..., :3] *= premul[..., 3:4]
    img = Image.fromarray(to_u8(premul), "RGBA").resize(size, Image.Resampling.LANCZOS)
    out = to_f32(img)
    a = out[..., 3:4]
    out[..., :3] = np.where(a > 1e-3, np.clip(out[..., :3] / np.maximum(a, 1e-3), 0.0, 1.0), 0.0)
    return out


def composite(canvas: F32, item: F32, x0: int, y0: int) -> None:
    """Paint straight-alpha RGBA ``item`` over ``canvas`` (in place) with its corner at x0, y0."""
    h, w = canvas.shape[:2]
    ih, iw = item.shape[:2]
    fx0, fy0, fx1, fy1 = max(x0, 0), max(y0, 0), min(x0 + iw, w), min(y0 + ih, h)
    if fx1 <= fx0 or fy1 <= fy0:
        return
    src = item[fy0 - y0 : fy1 - y0, fx0 - x0 : fx1 - x0]
    dst = canvas[fy0:fy1, fx0:fx1]
    sa, da = src[..., 3:4], dst[..., 3:4]
    out_a = sa + da * (1.0 - sa)
    rgb = (src[..., :3] * sa + dst[..., :3] * da * (1.0 - sa)) / np.maximum(out_a, 1e-6)
    dst[..., :3] = np.where(out_a > 0, rgb, dst[..., :3])
    dst[..., 3:4] = out_a


def _bias(prompt: str) -> tuple[float, float]:
    """Preferred placement (fractions of width and height) from position words, or centre."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    bx = 0.15 if "left" in words else (0.85 if "right" in words else 0.5)
    by = (
        0.2
        if words & {"top", "above", "upper"}
        else (0.8 if words & {"bottom", "below", "lower", "floor"} else 0.5)
    )
    return bx, by


def _edit(canvas: F32, fg: F32, spec: EditingInput, progress: ProgressFn) -> None:
    """Composite every reference cut-out in the freest place left, shrinking it to fit."""
    h, w = canvas.shape[:2]
    occupied = np.asarray(fg > 0.5, dtype=np.float64)
    rng = np.random.default_rng([spec.seed % 2**63, 0xED17])
    bias = _bias(spec.prompt)
    count = len(spec.references)
    side = min(w, h) * max(0.22, min(0.45, 0.6 / np.sqrt(max(count, 1))))
    for i, ref in enumerate(spec.references):
        cut = _cutout(ref, max(64, round(side * 1.5)))
        size, _, (x0, y0) = _fit(cut, side, occupied, rng, bias)
        item = _resize_rgba(cut, size)
        composite(canvas, item, x0, y0)
        footprint = np.zeros((h, w), np.float64)
        foot = (item[..., 3] > 0.3).astype(np.float64)
        footprint[y0 : y0 + size[1], x0 : x0 + size[0]] = foot[: h - y0, : w - x0]
        occupied = np.maximum(occupied, footprint)
        progress(0.3 + 0.5 * (i + 1) / count)


def _fit(
    cut: F32,
    side: float,
    occupied: npt.NDArray[np.float64],
    rng: np.random.Generator,
    bias: tuple[float, float],
) -> tuple[tuple[int, int], float, tuple[int, int]]:
    """Size, overlap and corner for a cut-out: the largest of ``_SHRINK`` that fits freely."""
    best: tuple[tuple[int, int], float, tuple[int, int]] | None = None
    for shrink in _SHRINK:
        k = shrink * side / max(cut.shape[:2])
        size = (max(1, round(cut.shape[1] * k)), max(1, round(cut.shape[0] * k)))
        overlap, spot = _free_spot(occupied, size, rng, bias)
        if best is None or overlap < best[1] - 0.01:
            best = (size, overlap, spot)
        if overlap <= _FREE_ENOUGH:
            return best
    return best if best is not None else ((1, 1), 1.0, (0, 0))


def _free_spot(
    occupied: npt.NDArray[np.float64],
    size: tuple[int, int],
    rng: np.random.Generator,
    bias: tuple[float, float],
) -> tuple[float, tuple[int, int]]:
    """The size[0] x size[1] box overlapping ``occupied`` the least: overlap, top-left corner.

    Among boxes about as free, the one nearer the prompt's preferred position wins, with a
    small seeded jitter deciding between equals.
    """
    h, w = occupied.shape
    bw, bh = min(size[0], w), min(size[1], h)
    integral = np.asarray(cv2.integral(occupied), dtype=np.float64)
    mx, my = min(round(0.03 * w), (w - bw) // 2), min(round(0.03 * h), (h - bh) // 2)
    xs = np.unique(np.linspace(mx, w - bw - mx, _GRID).round().astype(int))
    ys = np.unique(np.linspace(my, h - bh - my, _GRID).round().astype(int))
    x0, y0 = np.meshgrid(xs, ys)
    covered = (
        integral[y0 + bh, x0 + bw]
        - integral[y0, x0 + bw]
        - integral[y0 + bh, x0]
        + integral[y0, x0]
    )
    overlap = covered / float(bw * bh)
    cx, cy = (x0 + bw / 2) / w - bias[0], (y0 + bh / 2) / h - bias[1]
    score = overlap + 0.08 * np.sqrt(cx * cx + cy * cy) + 0.03 * rng.random(overlap.shape)
    best = int(np.argmin(score))
    return float(overlap.flat[best]), (int(x0.flat[best]), int(y0.flat[best]))


def _swap(canvas: F32, fg: F32, subject: Entity) -> None:
    """Replace the base's person by the subject's cut-out, fitted to the person's box."""
    h, w = canvas.shape[:2]
    person = fg > 0.5
    if not person.any():
        person = np.zeros((h, w), np.bool_)
        person[round(0.1 * h) : round(0.95 * h), round(0.3 * w) : round(0.7 * w)] = True
    ys, xs = np.nonzero(person)
    top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    work = max(64, min(1280, round(1.25 * (bottom - top))))
    if subject.image is not None:
        cut = _cutout(subject.image, work)
    else:
        cut = to_f32(segment(placeholder("subject", subject.name, work)))
    # Clear the old person (and a rim around it) to a smooth fit of the background.
    grow = max(2, round(0.01 * max(h, w)))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1))
    clear = np.asarray(cv2.dilate((fg > 0.02).astype(np.uint8), kernel), dtype=np.float32)
    soft = np.maximum(gaussian(clear, grow / 2.0), clear)[..., None]
    backdrop = smooth_background(np.ascontiguousarray(canvas[..., :3]), np.maximum(fg, clear))
    if float(canvas[..., 3].min()) < 0.9:  # a cut-out base: the old person becomes clear
        canvas[..., 3:4] *= 1.0 - soft
    else:
        canvas[..., :3] = canvas[..., :3] + soft * (backdrop - canvas[..., :3])
    bh, bw = bottom - top, right - left
    k = min(bh / cut.shape[0], max(bw * 1.6, 0.25 * w) / cut.shape[1])
    size = (max(1, round(cut.shape[1] * k)), max(1, round(cut.shape[0] * k)))
    item = _resize_rgba(cut, size)
    x0 = min(max(round((left + right) / 2 - size[0] / 2), 0), max(0, w - size[0]))
    composite(canvas, item, x0, bottom - size[1])


def dominant_colour(img: Image.Image) -> F32:
    """The most common colour of an image's segmented foreground (median-cut palette)."""
    cut = _cutout(img, 128)
    pixels = cut[cut[..., 3] > 0.5][:, :3]
    if pixels.shape[0] == 0:
        pixels = cut[..., :3].reshape(-1, 3)
    strip = Image.fromarray(to_u8(pixels.reshape(1, -1, 3)))
    quant = strip.quantize(colors=4, method=Image.Quantize.MEDIANCUT)
    palette = np.array(quant.getpalette() or [0] * 12, dtype=np.float32).reshape(-1, 3)[:4]
    counts = np.bincount(np.asarray(quant).ravel(), minlength=4)[:4]
    colour: F32 = (palette[int(np.argmax(counts))] / 255.0).astype(np.float32)
    return colour


def _lab(rgb: F32) -> F32:
    return np.asarray(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2Lab), np.float32)


def product_region(canvas: F32, fg: F32, product: Entity | None) -> F32:
    """Soft mask of the product: foreground near the product's dominant colour, else all of it."""
    region = fg
    if product is not None and product.image is not None:
        target = _lab(dominant_colour(product.image).reshape(1, 1, 3))[0, 0]
        dist = np.linalg.norm(_lab(canvas[..., :3]) - target, axis=-1)
        match = (dist < 28.0) & (fg > 0.5)
        match = (
            cv2.morphologyEx(match.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
        )
        if float(match.mean()) >= _MIN_REGION:
            region = match.astype(np.float32)
    h, w = fg.shape
    soft = gaussian(region.astype(np.float32), max(0.7, 0.002 * max(h, w)))
    return np.where(region > 0.5, np.maximum(soft, region), soft).astype(np.float32)


def _enhance_product(canvas: F32, fg: F32, product: Entity | None) -> None:
    """Sharpen and lift contrast and saturation on the product region only."""
    h, w = fg.shape
    mask = product_region(canvas, fg, product)
    gain = 0.5 + 0.5 * min(max(product.weight if product else 1.0, 0.0), 2.0)
    rgb = canvas[..., :3]
    sigma = max(0.8, 0.0015 * max(h, w))
    enhanced = unsharp_luma(rgb, 0.9 * gain, sigma)
    inside = mask > 0.5
    mean = enhanced[inside].mean(axis=0) if inside.any() else enhanced.reshape(-1, 3).mean(axis=0)
    enhanced = np.clip(mean + (1.0 + 0.25 * gain) * (enhanced - mean), 0.0, 1.0)
    grey = (enhanced @ LUMA)[..., None]
    enhanced = np.clip(grey + (1.0 + 0.15 * gain) * (enhanced - grey), 0.0, 1.0)
    m = mask[..., None]
    canvas[..., :3] = np.where(m > 0.0, rgb + m * (enhanced - rgb), rgb)


def enhance_detail(img: Image.Image, strength: float) -> Image.Image:
    """DETAIL_ENHANCER: boost fine texture with a two-band unsharp mask on luminance.

    The fine band (sigma 1) and a medium band (sigma 1 to 3) of the luma are added back,
    scaled by ``strength``; detail weaker than the noise floor is left alone so flat areas
    do not turn grainy. Chroma and alpha are unchanged.

    Args:
        img: An RGB or RGBA image.
        strength: 0 (unchanged) to 1 (strongest).

    Returns:
        An image of the same size and mode.
    """
    rgb, alpha = split_alpha(img)
    if strength <= 0.0:
        return img.copy()
    luma = np.ascontiguousarray(rgb @ LUMA)
    fine_blur, mid_blur = gaussian(luma, 1.0), gaussian(luma, 3.0)
    fine, mid = luma - fine_blur, fine_blur - mid_blur
    gate = smoothstep(0.002, 0.012, np.abs(fine))
    boost = strength * (1.6 * fine * gate + 0.6 * mid)
    out = np.clip(rgb + boost[..., None], 0.0, 1.0).astype(np.float32)
    if alpha is None:
        return Image.fromarray(to_u8(out))
    return Image.fromarray(to_u8(np.concatenate([out, alpha[..., None]], axis=-1)))
