"""The local evaluator's measures on synthetic images whose properties are known."""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np
import pytest
from pictures import dark_and_blurred, scene
from PIL import Image, ImageEnhance, ImageFilter

from scripts.faces import face_image, no_face_image
from server.compute.processors.adjust import Adjustment, adjust_image
from server.domain.enums import Strategy
from server.evaluation.base import EvaluationError, EvaluationInput
from server.evaluation.local import LOW, WEIGHTS, LocalEvaluator, luma, measure


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _judge(image: Image.Image, **expect: Any) -> tuple[float, dict[str, float], str]:
    item = EvaluationInput(output=_png(image), strategy=Strategy.GENERATE, **expect)
    evaluation = measure(item, 10**8)
    return evaluation.score, evaluation.criteria, evaluation.feedback


def checkerboard(side: int = 256, cell: int = 16) -> Image.Image:
    pattern = (np.indices((side, side)).sum(axis=0) // cell % 2) * 200 + 28
    return Image.fromarray(pattern.astype(np.uint8)).convert("RGB")


def test_a_sharp_checkerboard_is_sharper_than_its_blur() -> None:
    board = checkerboard()
    _, sharp, _ = _judge(board)
    _, soft, feedback = _judge(board.filter(ImageFilter.GaussianBlur(6)))
    assert sharp["sharpness"] > 0.9  # pixel-sharp edges
    assert soft["sharpness"] < 0.2
    assert "soft" in feedback


def test_clipped_exposure_scores_below_balanced() -> None:
    portrait = face_image(256, 256)
    _, balanced, _ = _judge(portrait)
    _, dark, dark_note = _judge(ImageEnhance.Brightness(portrait).enhance(0.25))
    _, bright, bright_note = _judge(ImageEnhance.Brightness(portrait).enhance(3.0))
    assert balanced["exposure"] > 0.9
    assert dark["exposure"] < 0.5
    assert bright["exposure"] < 0.5
    assert "under-exposed" in dark_note
    assert "over-exposed" in bright_note


def test_a_flat_image_has_low_contrast() -> None:
    flat = Image.new("RGB", (128, 128), (120, 120, 120))
    _, criteria, feedback = _judge(flat)
    assert criteria["contrast"] == 0.0
    assert "flat" in feedback


def test_added_noise_is_measured_and_edges_are_not_noise() -> None:
    _, board, _ = _judge(checkerboard())
    portrait = np.asarray(face_image(256, 256), dtype=np.float64)
    grain = np.random.default_rng(1).normal(0, 14, portrait.shape)
    noisy = Image.fromarray(np.clip(portrait + grain, 0, 255).astype(np.uint8))
    _, criteria, feedback = _judge(noisy)
    assert board["noise"] == 1.0  # all edges, no grain
    assert criteria["noise"] < 0.3
    assert "noisy" in feedback


def test_a_face_is_found_only_where_there_is_one() -> None:
    _, with_face, _ = _judge(face_image(256, 256), expects_face=True)
    _, without, feedback = _judge(no_face_image(256, 256), expects_face=True)
    _, not_asked, _ = _judge(no_face_image(256, 256))
    assert with_face["face"] == 1.0
    assert without["face"] == 0.0
    assert "no face found" in feedback
    assert "face" not in not_asked


def test_size_match_and_fidelity_outside_the_edit() -> None:
    portrait = face_image(256, 256)
    base = _png(portrait)
    _, exact, _ = _judge(portrait, expected_size=(256, 256))
    _, off, feedback = _judge(portrait, expected_size=(256, 512))
    assert exact["size"] == 1.0
    assert off["size"] == pytest.approx(0.5)
    assert "asked 256x512" in feedback
    brighter = ImageEnhance.Brightness(portrait).enhance(1.3)
    _, toned, _ = _judge(brighter, base=base, edited_region="none")
    _, moved, moved_note = _judge(checkerboard(), base=base, edited_region="none")
    _, global_edit, _ = _judge(checkerboard(), base=base, edited_region="all")
    assert toned["fidelity"] > 0.9  # a global tone change keeps the structure
    assert moved["fidelity"] < 0.6
    assert "departs from the base" in moved_note
    assert "fidelity" not in global_edit


def test_the_total_is_the_weighted_mean_of_the_criteria() -> None:
    score, criteria, _ = _judge(face_image(128, 128), expects_face=True)
    expected = sum(WEIGHTS[k] * v for k, v in criteria.items()) / sum(WEIGHTS[k] for k in criteria)
    assert score == pytest.approx(expected, abs=1e-3)
    assert set(criteria) == {"sharpness", "exposure", "contrast", "noise", "face"}


async def test_undecodable_output_is_an_evaluation_error() -> None:
    evaluator = LocalEvaluator(max_pixels=10**6)
    with pytest.raises(EvaluationError):
        await evaluator.evaluate(
            EvaluationInput(output=b"not an image", strategy=Strategy.GENERATE)
        )


# -- criteria the AGENTIC loop's other levers cannot move ----------------------------------


def _tone(image: Image.Image, **values: float) -> Image.Image:
    """``image`` through the IMAGE_ADJUSTER processor's own arithmetic."""
    adjustment = Adjustment(
        brightness=values.get("brightness", 0.0),
        contrast=values.get("contrast", 0.0),
        gamma=values.get("gamma", 1.0),
    )
    return adjust_image(image, adjustment, "")


TONES = {
    "brighter x2": {"brightness": 1.0},
    "darker x0.6": {"brightness": -0.4},
    "contrast +0.3": {"contrast": 0.3},
    "contrast -0.3": {"contrast": -0.3},
    "gamma 1.5": {"gamma": 1.5},
    "brighter x2, contrast +0.3": {"brightness": 1.0, "contrast": 0.3},
}


@pytest.mark.parametrize("source", ["scene", "portrait"])
def test_brightening_and_contrast_leave_the_sharpness_of_a_blurred_picture(source: str) -> None:
    sharp = scene() if source == "scene" else face_image(320, 320)
    blurred = dark_and_blurred(sharp, blur=2.0, gain=0.35)

    def judged(image: Image.Image) -> tuple[float, float]:
        item = EvaluationInput(output=_png(image), strategy=Strategy.IMAGE_ADJUSTING)
        evaluation = measure(item, 10**8)
        return evaluation.criteria["sharpness"], evaluation.measures["detail_ratio"]

    score, ratio = judged(blurred)
    for name, values in TONES.items():
        after_score, after_ratio = judged(_tone(blurred, **values))
        assert after_score == pytest.approx(score, abs=0.04), name
        assert after_ratio == pytest.approx(ratio, rel=0.08), name
    # The raw Laplacian variance the criterion used to be grows ~6.8x from the first
    # change alone: the reason it is normalised.
    grey = luma(np.asarray(blurred.convert("RGB")))
    brighter = luma(np.asarray(_tone(blurred, brightness=1.0, contrast=0.3).convert("RGB")))
    laplacian = [float(cv2.Laplacian(g, cv2.CV_64F).var()) for g in (grey, brighter)]
    assert laplacian[1] > 5 * laplacian[0]


@pytest.mark.parametrize("blur", [1.5, 2.0, 3.0])
def test_a_blurred_picture_scores_lower_than_its_sharp_source_at_any_exposure(
    blur: float,
) -> None:
    source = scene()
    gains = (0.35, 0.6, 1.0, 1.3)
    sharp = [_judge(ImageEnhance.Brightness(source).enhance(g))[1]["sharpness"] for g in gains]
    soft = [_judge(dark_and_blurred(source, blur=blur, gain=g))[1]["sharpness"] for g in gains]
    soft += [
        _judge(_tone(dark_and_blurred(source, blur), **v))[1]["sharpness"] for v in TONES.values()
    ]
    assert max(soft) < min(sharp) - 0.1
    assert min(sharp) > 0.95
    if blur >= 2.0:
        assert max(soft) < LOW  # a finding, whatever the exposure


def test_contrast_and_noise_are_judged_relative_to_the_level() -> None:
    grainy = np.asarray(scene(), dtype=np.float64) * 0.5
    grainy += np.random.default_rng(2).normal(0, 3, grainy.shape)
    dim = Image.fromarray(np.clip(grainy, 0, 255).astype(np.uint8))
    _, before, _ = _judge(dim)
    _, brighter, _ = _judge(_tone(dim, brightness=0.8))
    assert brighter["contrast"] == pytest.approx(before["contrast"], abs=0.03)
    assert brighter["noise"] == pytest.approx(before["noise"], abs=0.05)
    _, flatter, _ = _judge(_tone(dim, contrast=-0.3))
    assert flatter["contrast"] < before["contrast"] - 0.2  # the contrast lever does move it


def test_a_level_short_of_the_band_is_named_even_with_a_passing_exposure_score() -> None:
    portrait = face_image(256, 256)  # mean level about 0.45
    _, criteria, feedback = _judge(ImageEnhance.Brightness(portrait).enhance(0.68))
    assert LOW <= criteria["exposure"] < 1.0
    assert "a little under-exposed (mean level 0.3" in feedback
    _, fine, fine_note = _judge(portrait)
    assert fine["exposure"] == 1.0
    assert "exposed" not in fine_note
