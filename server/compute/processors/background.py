"""BACKGROUND_FIX: keep the foreground (person, product) and replace or clean the background.

The foreground is the image's alpha when it has real transparency, else a GrabCut
segmentation seeded with a central rectangle as probable foreground and the image borders
as background, run on a small copy and brought back to full size with an edge-aware
(guided) upsampling. The mask is grown by ``mask_expansion`` pixels, then the background is
replaced by the given image (scaled to cover, centre-cropped), by a backdrop derived from
the prompt's colour and style words, or, with neither, by a smooth fit of the existing
background (evened out and free of noise).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

from server.compute.processors.imaging import (
    F32,
    LUMA,
    U8,
    bleed,
    mask_from_border,
    smoothstep,
    split_alpha,
    to_f32,
    to_u8,
)

ProgressFn = Callable[[float], None]

MAX_EXPANSION = 256
_GRABCUT_SIDE = 320  # GrabCut runs on a copy whose longer side is at most this
_GRABCUT_ITERATIONS = 5
_NEUTRAL = (0.86, 0.86, 0.87)  # light grey seamless, for prompts without colour words
_COLOURS: dict[str, tuple[float, float, float]] = {
    "white": (0.96, 0.96, 0.96),
    "ivory": (0.95, 0.93, 0.87),
    "cream": (0.94, 0.90, 0.80),
    "beige": (0.87, 0.80, 0.68),
    "sand": (0.84, 0.76, 0.62),
    "tan": (0.78, 0.66, 0.50),
    "brown": (0.45, 0.32, 0.22),
    "grey": (0.60, 0.60, 0.61),
    "gray": (0.60, 0.60, 0.61),
    "silver": (0.75, 0.76, 0.78),
    "charcoal": (0.25, 0.25, 0.27),
    "black": (0.08, 0.08, 0.09),
    "blue": (0.33, 0.50, 0.78),
    "navy": (0.12, 0.17, 0.35),
    "sky": (0.62, 0.78, 0.93),
    "teal": (0.18, 0.50, 0.52),
    "green": (0.50, 0.70, 0.52),
    "sage": (0.66, 0.74, 0.62),
    "olive": (0.45, 0.47, 0.28),
    "yellow": (0.96, 0.86, 0.45),
    "orange": (0.95, 0.60, 0.30),
    "red": (0.78, 0.20, 0.20),
    "pink": (0.95, 0.76, 0.80),
    "purple": (0.52, 0.38, 0.66),
    "lavender": (0.78, 0.72, 0.90),
}
_SHADES = {"light": 0.45, "pale": 0.5, "pastel": 0.45, "dark": -0.45, "deep": -0.35}
_GRADIENT_WORDS = {"gradient", "graduated", "ombre", "vignette"}
_STUDIO_WORDS = {"studio", "seamless", "backdrop", "sweep", "cyclorama", "paper"}


@dataclass(frozen=True, slots=True)
class BackgroundSpec:
    """What replaces the background."""

    prompt: str
    image: Image.Image | None
    mask_expansion: int
    seed: int


def fix_background(img: Image.Image, spec: BackgroundSpec, progress: ProgressFn) -> Image.Image:
    """Replace or clean the background of ``img``, keeping its foreground.

    Args:
        img: The RGB or RGBA picture.
        spec: Replacement image or prompt (or neither: clean), mask growth and seed.
        progress: Called between steps with increasing values below 1.

    Returns:
        An opaque RGB image of the same size.
    """
    rgb, alpha_in = split_alpha(img)
    h, w = rgb.shape[:2]
    if alpha_in is not None and float(alpha_in.min()) < 0.9:
        alpha = alpha_in
        rgb = bleed(np.concatenate([rgb, alpha[..., None]], axis=-1), alpha > 0.98, 3.0)
    else:
        alpha = foreground_mask(rgb, spec.seed)
    progress(0.35)
    alpha = grow_mask(alpha, spec.mask_expansion)
    progress(0.5)
    if spec.image is not None:
        backdrop = cover(spec.image, w, h)
    elif spec.prompt.strip():
        backdrop = backdrop_from_prompt(spec.prompt, w, h, spec.seed)
    else:
        backdrop = smooth_background(rgb, alpha)
    progress(0.8)
    a = alpha[..., None]
    out = to_u8(backdrop + a * (rgb - backdrop))
    kept = np.asarray(np.round(rgb * 255.0), dtype=np.uint8)
    return Image.fromarray(np.where(a >= 1.0, kept, out))


def foreground_mask(rgb: F32, seed: int) -> F32:
    """Soft foreground alpha in [0, 1] of an opaque picture (GrabCut, guided upsampling).

    Args:
        rgb: (h, w, 3) float pixels in [0, 1].
        seed: Seeds OpenCV's random generator so the segmentation is reproducible.
    """
    h, w = rgb.shape[:2]
    scale = min(1.0, _GRABCUT_SIDE / max(h, w))
    sw, sh = max(8, round(w * scale)), max(8, round(h * scale))
    small = np.asarray(cv2.resize(to_u8(rgb), (sw, sh), interpolation=cv2.INTER_AREA), np.uint8)
    fg = _grabcut(small, seed)
    if not fg.any():  # nothing stood out: fall back to keying against the border colour
        fg = mask_from_border(to_f32(Image.fromarray(small))) > 0.5
    coarse = np.asarray(
        cv2.resize(fg.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), np.float32
    )
    if scale < 1.0:
        coarse = _guided(np.ascontiguousarray(rgb @ LUMA), coarse, round(2.0 / scale), 1e-3)
    return smoothstep(0.2, 0.8, coarse)


def _grabcut(small: U8, seed: int) -> np.ndarray[tuple[int, int], np.dtype[np.bool_]]:
    """Foreground pixels of a small copy: central rectangle probable fg, borders background."""
    sh, sw = small.shape[:2]
    mask = np.full((sh, sw), cv2.GC_PR_BGD, dtype=np.uint8)
    mask[round(0.06 * sh) :, round(0.18 * sw) : round(0.82 * sw)] = cv2.GC_PR_FGD
    band = max(1, round(0.02 * min(sh, sw)))
    mask[:band] = cv2.GC_BGD
    mask[:, :band] = cv2.GC_BGD
    mask[:, sw - band :] = cv2.GC_BGD
    bgd = np.zeros((1, 65), np.float64)
    fgd = np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed % 2**31)
    try:
        cv2.grabCut(small, mask, (0, 0, 0, 0), bgd, fgd, _GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        return np.zeros((sh, sw), dtype=np.bool_)
    fg = np.asarray((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD), dtype=np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if count <= 1:
        return np.zeros((sh, sw), dtype=np.bool_)
    areas = np.asarray(stats, dtype=np.int64)[1:, cv2.CC_STAT_AREA]
    keep = np.concatenate([[False], areas >= 0.05 * areas.max()])
    return np.asarray(keep[np.asarray(labels)], dtype=np.bool_)


def _guided(guide: F32, src: F32, radius: int, eps: float) -> F32:
    """He et al.'s guided filter: ``src`` smoothed but following the edges of ``guide``."""
    k = (2 * radius + 1, 2 * radius + 1)

    def box(a: npt.NDArray[np.floating[Any]]) -> F32:
        return np.asarray(cv2.blur(a, k, borderType=cv2.BORDER_REFLECT), dtype=np.float32)

    mean_i, mean_p = box(guide), box(src)
    var_i = box(guide * guide) - mean_i * mean_i
    cov_ip = box(guide * src) - mean_i * mean_p
    a = cov_ip / (var_i + np.float32(eps))
    b = mean_p - a * mean_i
    out: F32 = np.clip(box(a) * guide + box(b), 0.0, 1.0)
    return out.astype(np.float32)


def grow_mask(alpha: F32, pixels: int) -> F32:
    """The mask grown outwards by ``pixels`` (Euclidean), with a one pixel soft edge."""
    if pixels <= 0:
        return alpha
    outside = np.asarray(alpha < 0.5, dtype=np.uint8)
    if not outside.any() or outside.all():
        return alpha
    dist = np.asarray(cv2.distanceTransform(outside, cv2.DIST_L2, 5), dtype=np.float32)
    grown: F32 = np.clip(pixels + 0.5 - dist, 0.0, 1.0)
    out: F32 = np.maximum(alpha, grown)
    return out


def cover(img: Image.Image, w: int, h: int) -> F32:
    """``img`` scaled to cover w x h and centre-cropped, as opaque float RGB."""
    if img.mode == "RGBA":  # flatten transparency onto white
        flat = Image.new("RGB", img.size, (255, 255, 255))
        flat.paste(img, mask=img.getchannel("A"))
        img = flat
    k = max(w / img.width, h / img.height)
    sw, sh = max(w, round(img.width * k)), max(h, round(img.height * k))
    x0, y0 = (sw - w) / 2, (sh - h) / 2
    box = (x0 / k, y0 / k, (x0 + w) / k, (y0 + h) / k)
    out = img.convert("RGB").resize((w, h), Image.Resampling.LANCZOS, box=box)
    return to_f32(out)


def backdrop_from_prompt(prompt: str, w: int, h: int, seed: int) -> F32:
    """A plain, seamless-studio or gradient backdrop coloured by the prompt's words.

    Colour words (white, grey, black, blue, beige, pink, green, ...) are averaged, shade
    words (light, dark, ...) lighten or darken; "studio"/"seamless" give a wall-to-floor
    sweep, "gradient" a stronger top-to-bottom gradient. Without colour words the colour is
    a neutral light grey and the style a seamless sweep. A faint seeded dither prevents
    banding.
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    found = [_COLOURS[word] for word in words if word in _COLOURS]
    colour = np.mean(np.array(found or [_NEUTRAL], dtype=np.float32), axis=0)
    shade = sum(_SHADES.get(word, 0.0) for word in words)
    if shade > 0:
        colour = colour + min(shade, 0.8) * (1.0 - colour)
    elif shade < 0:
        colour = colour * (1.0 + max(shade, -0.8))
    styles = set(words)
    ys = ((np.arange(h) + 0.5) / h).astype(np.float32)[:, None]
    xs = ((np.arange(w) + 0.5) / w).astype(np.float32)[None, :]
    if styles & _GRADIENT_WORDS:
        light = np.broadcast_to(1.12 - 0.3 * ys, (h, w))
    elif styles & _STUDIO_WORDS or not found:
        floor = smoothstep(0.62, 0.9, ys)
        spot = np.exp(-(((xs - 0.5) * w / max(w, h)) ** 2) / 0.18)
        light = (1.04 - 0.06 * ys - 0.08 * floor) * (0.96 + 0.05 * spot)
    else:
        light = np.ones((h, w), dtype=np.float32)
    rgb = colour[None, None, :] * light[..., None]
    dither = np.random.default_rng(seed % 2**63).standard_normal((h, w, 1), dtype=np.float32)
    out: F32 = np.clip(rgb + dither * np.float32(0.6 / 255.0), 0.0, 1.0)
    return out.astype(np.float32)


def smooth_background(rgb: F32, alpha: F32) -> F32:
    """The background evened out: a least-squares quadratic surface per channel.

    The fit uses the background pixels only (weighted by 1 - alpha) of a 64 x 64 copy, so
    wrinkles, uneven light and noise go while the overall colour and fall-off stay.
    """
    h, w = rgb.shape[:2]
    n = 64
    weight = np.asarray(cv2.resize(1.0 - alpha, (n, n), interpolation=cv2.INTER_AREA), np.float32)
    small = np.asarray(cv2.resize(rgb, (n, n), interpolation=cv2.INTER_AREA), np.float32)
    weight = np.where(weight > 0.9, weight, 0.0)
    if float(weight.sum()) < 8.0:  # (almost) no background visible: use the border colour
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        return np.broadcast_to(np.median(border, axis=0), rgb.shape).astype(np.float32)
    grid = (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0
    basis = _quadratic_basis(grid[None, :], grid[:, None]).reshape(-1, 6)
    sw = np.sqrt(weight.reshape(-1, 1).astype(np.float64))
    coef, *_ = np.linalg.lstsq(basis * sw, small.reshape(-1, 3) * sw, rcond=None)
    yy = (np.arange(h, dtype=np.float64) + 0.5) / h * 2.0 - 1.0
    xx = (np.arange(w, dtype=np.float64) + 0.5) / w * 2.0 - 1.0
    fit = _quadratic_basis(xx[None, :], yy[:, None]) @ coef
    out: F32 = np.clip(fit, 0.0, 1.0).astype(np.float32)
    return out


def _quadratic_basis(
    x: np.ndarray[tuple[int, int], np.dtype[np.float64]],
    y: np.ndarray[tuple[int, int], np.dtype[np.float64]],
) -> np.ndarray[tuple[int, int, int], np.dtype[np.float64]]:
    x, y = np.broadcast_arrays(x, y)
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)
