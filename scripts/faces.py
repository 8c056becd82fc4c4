"""Synthetic pictures for tests and the demo: a frontal face the Haar cascade finds, and none.

The face is drawn at 4x and downsampled: a skin-toned oval under dark hair, dark brows over
shaded eye sockets with white eyeballs and dark irises, a shaded nose, a red mouth and a
neck. ``haarcascade_frontalface_default.xml`` finds it at every size from ~40 px faces up
(checked from 128 to 512 px canvases, face widths 30-55 % of the canvas, blur 0-2 px).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter

Rgb = tuple[int, int, int]

SKIN: Rgb = (215, 170, 140)
BACKDROP: Rgb = (90, 110, 140)


def face_image(
    width: int = 256,
    height: int = 256,
    *,
    centre: tuple[float, float] = (0.5, 0.5),
    face_width: float = 0.42,
    background: Rgb = BACKDROP,
    blur: float = 1.0,
) -> Image.Image:
    """An RGB picture of one synthetic frontal face.

    Args:
        width: Canvas width in pixels.
        height: Canvas height in pixels.
        centre: Face centre as fractions of the canvas width and height.
        face_width: Face width as a fraction of the canvas width.
        background: Backdrop colour.
        blur: Gaussian blur radius applied after downsampling (softens the drawing).
    """
    ss = 4
    img = Image.new("RGB", (width * ss, height * ss), background)
    d = ImageDraw.Draw(img)
    cx, cy = centre[0] * width * ss, centre[1] * height * ss
    fw = face_width * width * ss
    fh = fw * 1.3
    d.ellipse([cx - fw * 0.58, cy - fh * 0.62, cx + fw * 0.58, cy + fh * 0.1], fill=(50, 35, 25))
    d.rectangle(
        [cx - fw * 0.22, cy + fh * 0.3, cx + fw * 0.22, cy + fh * 0.8], fill=(195, 150, 120)
    )
    d.ellipse([cx - fw / 2, cy - fh * 0.45, cx + fw / 2, cy + fh * 0.5], fill=SKIN)
    ey = cy - fh * 0.08
    for side in (-1, 1):
        ex = cx + side * fw * 0.2
        d.ellipse(
            [ex - fw * 0.13, ey - fh * 0.12, ex + fw * 0.13, ey - fh * 0.08], fill=(60, 40, 30)
        )
        d.ellipse(
            [ex - fw * 0.12, ey - fh * 0.045, ex + fw * 0.12, ey + fh * 0.045], fill=(150, 105, 85)
        )
        d.ellipse(
            [ex - fw * 0.07, ey - fh * 0.025, ex + fw * 0.07, ey + fh * 0.025], fill=(245, 245, 245)
        )
        d.ellipse(
            [ex - fw * 0.035, ey - fh * 0.025, ex + fw * 0.035, ey + fh * 0.025], fill=(40, 30, 25)
        )
    nose = [
        (cx, ey + fh * 0.02),
        (cx - fw * 0.07, cy + fh * 0.17),
        (cx + fw * 0.07, cy + fh * 0.17),
    ]
    d.polygon(nose, fill=(190, 140, 110))
    d.ellipse([cx - fw * 0.08, cy + fh * 0.14, cx + fw * 0.08, cy + fh * 0.19], fill=(160, 110, 90))
    d.ellipse([cx - fw * 0.16, cy + fh * 0.27, cx + fw * 0.16, cy + fh * 0.33], fill=(150, 60, 60))
    out = img.resize((width, height), Image.Resampling.LANCZOS)
    return out.filter(ImageFilter.GaussianBlur(blur)) if blur else out


def no_face_image(width: int = 256, height: int = 256) -> Image.Image:
    """An RGB still life with no face: a gradient backdrop, a garment block and a bag."""
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    rgb: npt.NDArray[np.float32] = 200.0 - 40.0 * ys + 10.0 * xs + np.zeros((1, 1, 3), np.float32)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.rectangle([width * 0.3, height * 0.2, width * 0.6, height * 0.8], fill=(30, 60, 140))
    d.ellipse([width * 0.62, height * 0.5, width * 0.85, height * 0.75], fill=(150, 90, 40))
    return img
