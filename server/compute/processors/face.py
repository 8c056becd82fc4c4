"""Face detection (OpenCV's frontal-face Haar cascade) and the FACE_ENHANCER retouch.

Each detected face is retouched inside a feathered ellipse that fits in its detection box
grown by ``FACE_MARGIN``: the skin is smoothed edge-preservingly, the features (eyes,
brows, lips) are sharpened, local contrast is lifted and the face brightened a little.
Pixels outside that ellipse keep their exact values.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import cv2.data
import numpy as np

from server.compute.processors.imaging import (
    F32,
    LUMA,
    U8,
    gaussian,
    smoothstep,
    to_u8,
    unsharp_luma,
)
from server.compute.registry import ProcessorError

# x, y, width, height of one detection, in pixels of the analysed image.
FaceBox = tuple[int, int, int, int]
# A box, the rows and columns its retouch may touch, and its feathered mask over them.
_Face = tuple[FaceBox, tuple[slice, slice], F32]

FACE_MARGIN = 0.15  # fraction of the box size the retouch may reach beyond each box side
_CASCADE_FILE = "haarcascade_frontalface_default.xml"
_DETECT_SIDE = 1024  # detection runs on a copy at most this large
_MIN_FACE = 0.04  # faces smaller than this fraction of the shorter image side are ignored
_cascade_lock = threading.Lock()
_cascade: cv2.CascadeClassifier | None = None


@dataclass(frozen=True, slots=True)
class _Look:
    """How much of each retouch ingredient to use (prompt driven)."""

    smooth: float
    detail: float
    local_contrast: float
    lift: float


def _classifier() -> cv2.CascadeClassifier:
    """The process wide cascade, loaded on first use; callers hold ``_cascade_lock``."""
    global _cascade  # the one cached, lazily created object of this module
    if _cascade is None:
        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + _CASCADE_FILE)
        if cascade.empty():
            raise ProcessorError("internal", f"cannot load the face cascade {_CASCADE_FILE}")
        _cascade = cascade
    return _cascade


def detect_faces(rgb: U8) -> list[FaceBox]:
    """Frontal faces in an 8-bit RGB image, sorted top to bottom then left to right.

    Args:
        rgb: The image as an (h, w, 3) uint8 array.

    Returns:
        One (x, y, width, height) box per face, in the image's pixel coordinates.
    """
    h, w = rgb.shape[:2]
    grey = np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), dtype=np.uint8)
    scale = min(1.0, _DETECT_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        grey = np.asarray(cv2.resize(grey, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
    grey = np.asarray(cv2.equalizeHist(grey), dtype=np.uint8)
    side = max(24, round(_MIN_FACE * min(grey.shape)))
    if min(grey.shape) < side:
        return []
    # The classifier keeps per-call scratch state, so calls are serialised; they are short.
    with _cascade_lock:
        found = _classifier().detectMultiScale(
            grey, scaleFactor=1.1, minNeighbors=5, minSize=(side, side)
        )
    boxes = [
        (round(x / scale), round(y / scale), round(bw / scale), round(bh / scale))
        for x, y, bw, bh in found
    ]
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def face_region(box: FaceBox, h: int, w: int) -> tuple[slice, slice]:
    """Rows and columns a face's retouch may touch: the box grown by ``FACE_MARGIN``."""
    x, y, bw, bh = box
    mx, my = int(np.ceil(FACE_MARGIN * bw)), int(np.ceil(FACE_MARGIN * bh))
    return slice(max(0, y - my), min(h, y + bh + my)), slice(max(0, x - mx), min(w, x + bw + mx))


def face_mask(box: FaceBox, rows: slice, cols: slice) -> F32:
    """Feathered ellipse over the face (forehead to chin), 0 outside it, within the region."""
    x, y, bw, bh = box
    ys = np.arange(rows.start, rows.stop, dtype=np.float32) + 0.5
    xs = np.arange(cols.start, cols.stop, dtype=np.float32) + 0.5
    # The cascade's box spans brows to mouth; the ellipse reaches a little above and below.
    cx, cy, ax, ay = x + 0.5 * bw, y + 0.53 * bh, 0.49 * bw, 0.6 * bh
    r = np.sqrt(((xs[None, :] - cx) / ax) ** 2 + ((ys[:, None] - cy) / ay) ** 2)
    return (1.0 - smoothstep(0.72, 1.0, r.astype(np.float32))).astype(np.float32)


def _look(prompt: str) -> _Look:
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    smooth, detail, local, lift = 0.75, 0.6, 0.25, 0.04
    if words & {"smooth", "smoother", "soft", "softer", "retouch", "flawless", "clean"}:
        smooth = 1.0
    if words & {"natural", "subtle", "texture", "realistic"}:
        smooth = 0.45
    if words & {"sharp", "sharper", "crisp", "detail", "details", "detailed", "defined"}:
        detail, local = 1.0, 0.35
    if words & {"bright", "brighter", "glow", "glowing", "radiant", "luminous"}:
        lift = 0.08
    if words & {"dark", "darker", "moody"}:
        lift = 0.0
    return _Look(smooth, detail, local, lift)


def _blur_large(plane: F32, sigma: float) -> F32:
    """Gaussian blur of a 2-D plane; large sigmas are blurred on a reduced copy (it is smooth)."""
    factor = max(1, int(sigma // 4))
    if factor == 1:
        return gaussian(plane, sigma)
    h, w = plane.shape
    size = (max(1, w // factor), max(1, h // factor))
    small = np.asarray(cv2.resize(plane, size, interpolation=cv2.INTER_AREA), np.float32)
    blurred = gaussian(small, sigma / factor)
    return np.asarray(cv2.resize(blurred, (w, h), interpolation=cv2.INTER_LINEAR), np.float32)


def _retouch(crop: F32, face_w: int, look: _Look) -> F32:
    """The fully retouched version of a face crop (before blending).

    Skin is smoothed edge-preservingly (bilateral: fine grain at full size, blotches on a
    copy where the face is ~160 px wide), features are sharpened (luma unsharp mask), local
    contrast is lifted (a wide luma unsharp mask) and the face brightened a little.
    """
    fine = np.asarray(cv2.bilateralFilter(crop, 5, 0.08, 2.0), dtype=np.float32)
    if face_w > 160:
        h, w = crop.shape[:2]
        k = 160.0 / face_w
        small = np.asarray(
            cv2.resize(
                crop, (max(1, round(w * k)), max(1, round(h * k))), interpolation=cv2.INTER_AREA
            ),
            np.float32,
        )
        coarse = np.asarray(cv2.bilateralFilter(small, 7, 0.09, 3.0), np.float32) - small
        fine = fine + np.asarray(cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR))
    out = crop + look.smooth * (fine - crop)
    out = unsharp_luma(out, look.detail, max(0.8, 0.008 * face_w))
    luma = np.ascontiguousarray(out @ LUMA)
    wide = luma - _blur_large(luma, max(2.0, 0.06 * face_w))
    out = out + look.local_contrast * wide[..., None]
    lifted: F32 = np.clip(out + look.lift * (1.0 - out), 0.0, 1.0)
    return lifted.astype(np.float32)


def _pass(work: F32, faces: list[_Face], strength: float, look: _Look) -> None:
    """One retouch pass over float pixels, in place; only pixels inside the ellipses change."""
    h, w = work.shape[:2]
    for face in faces:
        box, (rows, cols), mask = face
        pad = max(4, box[2] // 8)  # filter context beyond the region, cut off again below
        prow = slice(max(0, rows.start - pad), min(h, rows.stop + pad))
        pcol = slice(max(0, cols.start - pad), min(w, cols.stop + pad))
        retouched = _retouch(np.ascontiguousarray(work[prow, pcol]), box[2], look)
        inner = retouched[
            rows.start - prow.start : rows.stop - prow.start,
            cols.start - pcol.start : cols.stop - pcol.start,
        ]
        base = work[rows, cols]
        # Outside the ellipse the mask is exactly 0, so those pixels keep their value.
        base += (strength * mask)[..., None] * (inner - base)


def _iterate(
    rgb: U8,
    boxes: list[FaceBox],
    strengths: list[float],
    look: _Look,
    on_step: Callable[[int], None],
) -> U8:
    """Run one pass per strength on the faces' area (in float32); the rest stays exact."""
    h, w = rgb.shape[:2]
    out = rgb.copy()
    regions = [face_region(box, h, w) for box in boxes]
    keep = [r.stop > r.start and c.stop > c.start for r, c in regions]
    boxes = [box for box, ok in zip(boxes, keep, strict=True) if ok]
    if not boxes or not strengths:
        return out
    regions = [face_region(box, h, w) for box in boxes]
    pad = max(4, max(box[2] for box in boxes) // 8)
    top = max(0, min(r.start for r, _ in regions) - pad)
    bottom = min(h, max(r.stop for r, _ in regions) + pad)
    left = max(0, min(c.start for _, c in regions) - pad)
    right = min(w, max(c.stop for _, c in regions) + pad)
    original = rgb[top:bottom, left:right]
    faces: list[_Face] = []
    touched = np.zeros(original.shape[:2], dtype=np.bool_)
    for x, y, bw, bh in boxes:
        box = (x - left, y - top, bw, bh)
        rows, cols = face_region(box, *original.shape[:2])
        mask = face_mask(box, rows, cols)
        touched[rows, cols] |= mask > 0.0
        faces.append((box, (rows, cols), mask))
    work = original.astype(np.float32) / np.float32(255.0)
    for i, strength in enumerate(strengths):
        _pass(work, faces, strength, look)
        on_step(i + 1)
    out[top:bottom, left:right] = np.where(touched[..., None], to_u8(work), original)
    return out


def enhance_faces(rgb: U8, faces: list[FaceBox], strength: float, prompt: str = "") -> U8:
    """Retouch every face in an 8-bit RGB image, blended by ``strength`` (0 to 1).

    Args:
        rgb: The image as an (h, w, 3) uint8 array; it is not modified.
        faces: Boxes from ``detect_faces``.
        strength: 0 leaves the image unchanged, 1 applies the full retouch.
        prompt: Free text hints: smooth/natural, sharp/detail, bright/dark.

    Returns:
        A new array; only pixels inside the faces' feathered ellipses differ from ``rgb``.
    """
    if strength <= 0.0:
        return rgb.copy()
    return _iterate(rgb, faces, [strength], _look(prompt), lambda _: None)


def face_detail(
    rgb: U8, faces: list[FaceBox], steps: int, on_step: Callable[[int], None], strength: float = 0.6
) -> U8:
    """REFINE's face pass: ``steps`` gentle retouch iterations, each on the previous result.

    Each iteration blends in ``1 - (1 - strength) ** (1 / steps)`` of a fresh retouch, so
    the overall strength is about ``strength`` whatever the count, while more steps refine
    more gradually.

    Args:
        rgb: The image as an (h, w, 3) uint8 array; it is not modified.
        faces: Boxes from ``detect_faces``.
        steps: Number of iterations, at least 1.
        on_step: Called with the number of finished iterations after each one.
        strength: Overall retouch strength, as in ``enhance_faces``.

    Returns:
        The image after the last iteration.
    """
    steps = max(1, steps)
    per_step = 1.0 - (1.0 - strength) ** (1.0 / steps)
    return _iterate(rgb, faces, [per_step] * steps, _look(""), on_step)
