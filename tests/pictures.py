"""Photo-like test pictures made here, with known sharpness and exposure (not the demo images)."""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter


def scene(width: int = 320, height: int = 240, seed: int = 5) -> Image.Image:
    """A sharp, well-exposed RGB scene: a graded backdrop, solid shapes, strokes and grain.

    Shapes are drawn at four times the size and reduced (clean anti-aliased edges); a fine
    grain of a few grey levels stands for texture. Mean level about 0.55.
    """
    rng = np.random.default_rng(seed)
    big = Image.new("RGB", (width * 4, height * 4))
    draw = ImageDraw.Draw(big)
    for y in range(height * 4):
        grey = int(200 - 80 * y / (height * 4))
        draw.line([(0, y), (width * 4, y)], fill=(grey, grey + 10, min(255, grey + 30)))
    for _ in range(14):
        x0, y0 = (int(v) for v in rng.integers(0, (width * 4 - 200, height * 4 - 200)))
        x1, y1 = x0 + int(rng.integers(80, 400)), y0 + int(rng.integers(80, 400))
        colour = tuple(int(v) for v in rng.integers(20, 235, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x1, y1], fill=colour)
    for k in range(8):
        x = (60 + 40 * k) * 2
        draw.line([(x, 40), (x + 60, 400)], fill=(30, 30, 30), width=6)
    small = np.asarray(big.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float64)
    grain = np.asarray(cv2.GaussianBlur(rng.normal(0.0, 1.0, (height, width)), (0, 0), 0.8))
    small += (6.0 * grain / grain.std())[..., None]
    return Image.fromarray(np.clip(small, 0, 255).round().astype(np.uint8))


def dark_and_blurred(image: Image.Image, blur: float = 2.0, gain: float = 0.35) -> Image.Image:
    """``image`` under a Gaussian blur of ``blur`` pixels, then darkened to ``gain``."""
    return ImageEnhance.Brightness(image.filter(ImageFilter.GaussianBlur(blur))).enhance(gain)


def png(image: Image.Image) -> bytes:
    """The PNG encoding of ``image``."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
