"""IMAGE_ADJUSTER: global brightness, gamma, contrast and saturation, plus free-text hints.

Each value v in -1..1 is applied as the enhancement factor f = 1 + v (0 changes nothing):

* brightness multiplies every channel by f (-1 gives black, 1 doubles);
* gamma g (0.25-4, 1 changes nothing; a task parameter the AGENTIC loop sets when
  brightness is at its bound, not a field of the public request) maps every channel
  value c to c ** (1 / g): above 1 lifts shadows and mid-tones, keeping black and white;
* contrast blends the image with its mean grey (mean luma) by f (-1 gives flat grey,
  1 doubles every pixel's distance to the mean);
* saturation blends the image with its greyscale (luma) version by f (-1 gives greyscale,
  1 doubles the colourfulness).

The prompt hints run first, then brightness, gamma, contrast and saturation, each result
clipped to the valid range. Alpha is kept as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from server.compute.processors.imaging import F32, LUMA, join_alpha, split_alpha

HINT_STEP = 0.2  # the adjustment one hint word stands for
MIN_GAMMA, MAX_GAMMA = 0.25, 4.0
_WARM_GAIN = np.array([1.08, 1.0, 0.92], dtype=np.float32)  # red up, blue down
_HINTS: tuple[tuple[str, str, float], ...] = (
    (r"\bwarm(er)?\b", "warmth", 1.0),
    (r"\bcool(er)?\b", "warmth", -1.0),
    (r"\bbrighter\b|\blighter\b", "brightness", HINT_STEP),
    (r"\bdarker\b", "brightness", -HINT_STEP),
    (r"\bmore\s+contrast(y)?\b|\bhigher\s+contrast\b|\bpunchier\b", "contrast", HINT_STEP),
    (r"\bless\s+contrast(y)?\b|\blower\s+contrast\b|\bflatter\b", "contrast", -HINT_STEP),
    (r"\bmore\s+saturat(ed|ion)\b|\bvivid\b|\bvibrant\b", "saturation", HINT_STEP),
    (r"\bless\s+saturat(ed|ion)\b|\bmuted\b|\bdesaturated\b", "saturation", -HINT_STEP),
)


@dataclass(frozen=True, slots=True)
class Adjustment:
    """Brightness, contrast and saturation changes, each in -1..1, a gamma and a colour balance."""

    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    warmth: float = 0.0  # +1 per "warmer", -1 per "cooler"
    gamma: float = 1.0


def parse_hints(prompt: str) -> Adjustment:
    """The adjustment the prompt's known words and phrases ask for (case-insensitive).

    Known: warmer/cooler, brighter/darker, more/less contrast, more/less saturated
    (or vivid/muted); each brightness, contrast or saturation hint stands for 0.2.
    """
    text = prompt.lower()
    totals = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "warmth": 0.0}
    for pattern, key, step in _HINTS:
        if re.search(pattern, text):
            totals[key] += step
    return Adjustment(**totals)


def hint_phrases(prompt: str) -> list[str]:
    """The known hint words and phrases found in ``prompt``, as written, in ``_HINTS`` order."""
    text = prompt.lower()
    return [m.group(0) for pattern, _, _ in _HINTS if (m := re.search(pattern, text))]


def brightness(rgb: F32, v: float) -> F32:
    """Every channel times 1 + v, clipped."""
    return _clip(rgb * np.float32(1.0 + v))


def gamma(rgb: F32, g: float) -> F32:
    """Every channel c becomes c ** (1 / g), clipped; 1 changes nothing."""
    return _clip(np.power(np.clip(rgb, 0.0, 1.0), np.float32(1.0 / g)))


def contrast(rgb: F32, v: float) -> F32:
    """Blend with the image's mean grey by 1 + v, clipped."""
    mean = np.float32(float(np.mean(rgb @ LUMA)))
    return _clip(mean + np.float32(1.0 + v) * (rgb - mean))


def saturation(rgb: F32, v: float) -> F32:
    """Blend with the greyscale (luma) version by 1 + v, clipped."""
    grey = (rgb @ LUMA)[..., None]
    return _clip(grey + np.float32(1.0 + v) * (rgb - grey))


def warmth(rgb: F32, amount: float) -> F32:
    """Shift the red/blue balance: positive is warmer (red up, blue down), negative cooler."""
    if amount == 0.0:
        return rgb
    gain = (_WARM_GAIN ** np.sign(amount)) ** abs(amount)
    return _clip(rgb * gain.astype(np.float32))


def apply_adjustment(rgb: F32, adj: Adjustment) -> F32:
    """Colour balance, brightness, gamma, contrast then saturation, each clipped.

    Neutral values (0, and 1 for gamma) leave the pixels as they are.
    """
    out = warmth(rgb, adj.warmth)
    if adj.brightness:
        out = brightness(out, adj.brightness)
    if adj.gamma != 1.0:
        out = gamma(out, adj.gamma)
    if adj.contrast:
        out = contrast(out, adj.contrast)
    if adj.saturation:
        out = saturation(out, adj.saturation)
    return out


def adjust_image(img: Image.Image, values: Adjustment, prompt: str) -> Image.Image:
    """Apply the prompt hints, then ``values`` (brightness, gamma, contrast, saturation).

    Args:
        img: An RGB or RGBA image.
        values: The explicit adjustment; its ``warmth`` is ignored (hints only).
        prompt: Free text hints, see ``parse_hints``.

    Returns:
        An image of the same size and mode.
    """
    rgb, alpha = split_alpha(img)
    rgb = apply_adjustment(rgb, parse_hints(prompt))
    explicit = Adjustment(values.brightness, values.contrast, values.saturation, gamma=values.gamma)
    rgb = apply_adjustment(rgb, explicit)
    return join_alpha(rgb, alpha)


def _clip(arr: npt.NDArray[np.floating[Any]]) -> F32:
    out: F32 = np.clip(arr, 0.0, 1.0).astype(np.float32, copy=False)
    return out
