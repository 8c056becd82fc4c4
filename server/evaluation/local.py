"""The local evaluator: no-reference quality measures with NumPy and OpenCV.

Every criterion is normalised to 0-1 (1 is best) and the total is their weighted mean
over the criteria that apply to the output. Each one is measured so that the AGENTIC
loop's other levers cannot move it: brightening, gamma and contrast change exposure (and
contrast) only, never the sharpness or noise score of the same picture.

* sharpness (weight 0.30): the fine-detail energy of the luma against its local contrast,
  neighbourhood by neighbourhood: r = the mean, over neighbourhoods with structure, of
  (LoG_1 * Y)^2 / (local variance of Y), where LoG_1 is the Laplacian after a 1-pixel
  Gaussian (which also ignores 8-bit steps). Within a neighbourhood a tone change is
  nearly affine, so only the shape of the edges counts; score r^3 / (r^3 + 0.4^3).
  Pixel-sharp edges score about 0.9, the same edges under a 1-pixel Gaussian blur 0.7,
  under 2 pixels below 0.2; fine texture (grain, fabric) raises the ratio.
* exposure (0.25): the mean luma level m (0-1) and the clipped share c (luma below 2% or
  above 98%); score (1 - clip((|m - 0.5| - 0.15) / 0.3)) x (1 - clip(c / 0.25)). A level
  outside 0.35-0.65 (where the level part falls below 1) is named in the feedback even
  when the score stays above the finding threshold.
* contrast (0.15): the spread of the luma relative to its level, s / m (standard
  deviation over mean, both 0-1), so brightening alone does not change it; score
  clip(s / m / 0.4) (the former s / 0.18 at the 0.45 level the loop aims for).
* noise (0.10): Immerkaer's noise sigma n (0-255) away from edges, at the level the
  picture would have at mean 0.5 (n x 0.5 / m), so brightening alone does not change it;
  score 1 - clip((n - 1.5) / 8).
* size (0.10, when the request fixes the size): min(w/W, W/w) x min(h/H, H/h).
* face (0.10, when the shot implies a face): 1 when a frontal face is detected, else 0.
* fidelity (0.15, when there is a base image and a region that should not change): the
  mean SSIM of the z-normalised lumas of output and base outside the edited region, so a
  global tone change does not count but a changed structure does.

Measures run on the luma at a working size (long side at most 512 pixels, area
resampled), so a score does not depend on the resolution. The raw measures go with
the evaluation: the next attempt's adjustments are computed from them.
"""

from __future__ import annotations

import asyncio
import math

import cv2
import numpy as np
import numpy.typing as npt

from server.compute.processors.face import detect_faces
from server.compute.processors.imaging import decode_input
from server.compute.registry import ProcessorError
from server.domain.model import Evaluation
from server.evaluation.base import EvaluationError, EvaluationInput

F64 = npt.NDArray[np.float64]
U8 = npt.NDArray[np.uint8]

WEIGHTS = {
    "sharpness": 0.30,
    "exposure": 0.25,
    "contrast": 0.15,
    "noise": 0.10,
    "size": 0.10,
    "face": 0.10,
    "fidelity": 0.15,
}
WORK_SIDE = 512
LOW = 0.6  # a criterion below this is a finding in the feedback
LEVEL_BAND = (0.35, 0.65)  # mean levels the exposure score does not count against
SHARPNESS_HALF = 0.4  # the detail ratio that scores 0.5
REFERENCE_LEVEL = 0.5  # noise is judged as if the mean level were this
_DARKEST = 0.01  # below this mean level there is no spread or noise to judge
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
_LUMA = np.array([0.299, 0.587, 0.114])


def _clip01(value: float) -> float:
    return min(1.0, max(0.0, value))


def _working(rgb: U8) -> U8:
    h, w = rgb.shape[:2]
    scale = min(1.0, WORK_SIDE / max(h, w))
    if scale >= 1.0:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def luma(rgb: U8) -> F64:
    """Rec. 601 luma, 0-255, as float."""
    out: F64 = rgb[..., :3].astype(np.float64) @ _LUMA
    return out


def _gaussian(grey: F64, sigma: float) -> F64:
    return np.asarray(cv2.GaussianBlur(grey, (0, 0), sigma), dtype=np.float64)


def sharpness(grey: F64) -> tuple[float, float]:
    """(score, detail ratio): fine-detail energy over local-contrast energy, window by window.

    In each neighbourhood (Gaussian, sigma 4) the energy of the Laplacian of the 1-pixel
    smoothed luma is divided by the local variance (window sigma 3); the ratio is averaged
    over the neighbourhoods with some structure (local variance at least 5% of the 90th
    percentile). A tone change is nearly affine within a neighbourhood, so brightness,
    contrast and gamma leave each ratio, and which neighbourhoods count, as they were;
    only clipping, which makes real hard edges, moves it. No structure: ratio 0.
    """
    detail = np.asarray(cv2.Laplacian(_gaussian(grey, 1.0), cv2.CV_64F, ksize=3), np.float64)
    mean = _gaussian(grey, 3.0)
    variance: F64 = np.maximum(_gaussian(grey * grey, 3.0) - mean * mean, 0.0)
    detail_energy, spread = _gaussian(detail * detail, 4.0), _gaussian(variance, 4.0)
    floor = 0.05 * float(np.percentile(spread, 90))
    structured = spread >= floor
    if floor <= 1e-9 or not structured.any():
        return 0.0, 0.0
    ratio = float(np.mean(detail_energy[structured] / spread[structured]))
    return ratio**3 / (ratio**3 + SHARPNESS_HALF**3), ratio


def exposure(grey: F64) -> tuple[float, float, float]:
    """(score, mean level 0-1, clipped share)."""
    level = float(grey.mean()) / 255.0
    clipped = float(np.mean((grey < 0.02 * 255) | (grey > 0.98 * 255)))
    level_score = 1.0 - _clip01((abs(level - 0.5) - 0.15) / 0.3)
    return level_score * (1.0 - _clip01(clipped / 0.25)), level, clipped


def contrast(grey: F64) -> tuple[float, float]:
    """(score, standard deviation of the luma 0-1): the spread relative to the level."""
    spread = float(grey.std()) / 255.0
    level = float(grey.mean()) / 255.0
    if level < _DARKEST:
        return 0.0, spread
    return _clip01(spread / level / 0.4), spread


def noise(grey: F64) -> tuple[float, float]:
    """(score, noise sigma 0-255 at the reference level) by Immerkaer's method (1996).

    The Laplacian-difference kernel answers to edges as much as to noise, so pixels near
    a Canny edge do not count; an image that is all edges has no measurable noise. The
    sigma is scaled to the reference mean level, as brightening would scale it.
    """
    h, w = grey.shape
    if h < 3 or w < 3:
        return 1.0, 0.0
    response = np.abs(cv2.filter2D(grey, cv2.CV_64F, _IMMERKAER))
    edges = cv2.Canny(np.clip(grey, 0, 255).astype(np.uint8), 50, 150)
    flat = cv2.dilate(edges, np.ones((3, 3), np.uint8)) == 0
    flat[0, :] = flat[-1, :] = flat[:, 0] = flat[:, -1] = False
    if not flat.any():
        return 1.0, 0.0
    sigma = float(response[flat].mean()) * math.sqrt(math.pi / 2) / 6.0
    sigma *= REFERENCE_LEVEL / max(_DARKEST, float(grey.mean()) / 255.0)
    return 1.0 - _clip01((sigma - 1.5) / 8.0), sigma


def size_match(actual: tuple[int, int], expected: tuple[int, int]) -> float:
    """1 for the requested size; less as either side departs from it."""
    (w, h), (ew, eh) = actual, expected
    return min(w / ew, ew / w) * min(h / eh, eh / h)


def ssim_map(a: F64, b: F64) -> F64:
    """The SSIM index map (Gaussian window, sigma 1.5) of two same-size luma images."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x: F64) -> F64:
        return np.asarray(cv2.GaussianBlur(x, (11, 11), 1.5), dtype=np.float64)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    out: F64 = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return out


def _normalised(grey: F64) -> F64:
    """The luma with mean 128 and a fixed spread: global tone changes do not count."""
    spread = float(grey.std()) or 1.0
    out: F64 = (grey - float(grey.mean())) / spread * 48.0 + 128.0
    return out


def fidelity(output: F64, base: F64, keep: npt.NDArray[np.bool_]) -> float:
    """Mean SSIM of the normalised lumas over the pixels that should not have changed."""
    if not keep.any():
        return 1.0
    index = ssim_map(_normalised(output), _normalised(base))
    return _clip01(float(index[keep].mean()))


def _rgb(data: bytes, max_pixels: int) -> U8:
    try:
        image = decode_input(data, max_pixels)
    except ProcessorError as exc:
        raise EvaluationError(str(exc)) from exc
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def measure(item: EvaluationInput, max_pixels: int) -> Evaluation:
    """Score ``item`` (blocking; run it in a thread)."""
    full = _rgb(item.output, max_pixels)
    height, width = full.shape[:2]
    work = _working(full)
    grey = luma(work)
    criteria: dict[str, float] = {}
    measures: dict[str, float] = {}
    criteria["sharpness"], measures["detail_ratio"] = sharpness(grey)
    criteria["exposure"], measures["mean_level"], measures["clipped"] = exposure(grey)
    criteria["contrast"], measures["luma_std"] = contrast(grey)
    criteria["noise"], measures["noise_sigma"] = noise(grey)
    if item.expected_size is not None:
        criteria["size"] = size_match((width, height), item.expected_size)
    faces = detect_faces(work) if item.expects_face or item.edited_region == "faces" else []
    if item.expects_face:
        criteria["face"] = 1.0 if faces else 0.0
        measures["faces"] = float(len(faces))
    if item.base is not None and item.edited_region != "all":
        base = luma(_working(_rgb(item.base, max_pixels)))
        if base.shape != grey.shape:
            size = (grey.shape[1], grey.shape[0])
            base = np.asarray(cv2.resize(base, size, interpolation=cv2.INTER_AREA), np.float64)
        keep = np.ones(grey.shape, dtype=bool)
        if item.edited_region == "faces":
            for x, y, w, h in faces:
                keep[y : y + h, x : x + w] = False
        criteria["fidelity"] = fidelity(grey, base, keep)
    total = sum(WEIGHTS[k] * v for k, v in criteria.items()) / sum(WEIGHTS[k] for k in criteria)
    return Evaluation(
        score=round(total, 4),
        criteria={k: round(v, 4) for k, v in criteria.items()},
        feedback=feedback(criteria, measures, (width, height), item.expected_size),
        provider="local",
        measures={k: round(v, 4) for k, v in measures.items()},
    )


def feedback(
    criteria: dict[str, float],
    measures: dict[str, float],
    size: tuple[int, int],
    expected: tuple[int, int] | None,
) -> str:
    """Short findings for every criterion below ``LOW``; "no issues found" otherwise.

    A mean level outside ``LEVEL_BAND`` is named even when the exposure score passes.
    """
    found: list[str] = []
    if criteria["sharpness"] < LOW:
        found.append(f"soft (detail ratio {measures['detail_ratio']:.2f})")
    level = measures["mean_level"]
    word = "under-exposed" if level < 0.5 else "over-exposed"
    if criteria["exposure"] < LOW:
        found.append(f"{word} (mean level {level:.2f}, {measures['clipped']:.0%} clipped)")
    elif not LEVEL_BAND[0] <= level <= LEVEL_BAND[1]:
        found.append(f"a little {word} (mean level {level:.2f})")
    if criteria["contrast"] < LOW:
        found.append(f"flat (luma spread {measures['luma_std']:.2f} at level {level:.2f})")
    if criteria["noise"] < LOW:
        found.append(f"noisy (sigma {measures['noise_sigma']:.1f})")
    if criteria.get("size", 1.0) < 0.99 and expected is not None:
        found.append(f"{size[0]}x{size[1]}, asked {expected[0]}x{expected[1]}")
    if criteria.get("face", 1.0) < LOW:
        found.append("no face found where the shot implies one")
    if criteria.get("fidelity", 1.0) < LOW:
        found.append(f"departs from the base outside the edit (SSIM {criteria['fidelity']:.2f})")
    return "; ".join(found) or "no issues found"


class LocalEvaluator:
    """Measures on this machine's CPU, a bounded number at a time, off the event loop."""

    name = "local"

    def __init__(self, *, max_pixels: int, concurrency: int = 2) -> None:
        self._max_pixels = max_pixels
        self._slots = asyncio.Semaphore(concurrency)

    async def evaluate(self, item: EvaluationInput) -> Evaluation:
        """Score ``item`` in a worker thread.

        Raises:
            EvaluationError: the output (or base) could not be decoded.
        """
        async with self._slots:
            return await asyncio.to_thread(measure, item, self._max_pixels)
