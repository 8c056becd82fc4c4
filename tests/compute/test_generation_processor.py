"""Tests for the deterministic CPU studio-shot renderer (GENERATION task type)."""

from __future__ import annotations

import io
import itertools
import struct
import zlib

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageDraw

from server.compute.processors.generation import (
    GenerationInput,
    ReferenceSet,
    RenderedImage,
    render_generation,
)
from server.compute.registry import ProcessorError


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _product_png(background: tuple[int, int, int] = (255, 255, 255)) -> bytes:
    img = Image.new("RGB", (200, 200), background)
    ImageDraw.Draw(img).rectangle([40, 30, 160, 170], fill=(220, 20, 20))
    return _encode(img)


def _subject_png() -> bytes:
    img = Image.new("RGB", (150, 400), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    draw.ellipse([55, 10, 95, 60], fill=(225, 190, 160))
    draw.polygon([(35, 65), (115, 65), (105, 230), (45, 230)], fill=(30, 40, 120))
    draw.rectangle([50, 230, 100, 390], fill=(40, 40, 40))
    return _encode(img)


def _style_png() -> bytes:
    return _encode(Image.new("RGB", (64, 64), (30, 70, 200)))


def _spec(
    *,
    width: int = 256,
    height: int = 256,
    seed: int = 1,
    steps: int = 4,
    prompt: str = "a studio shot",
    shot_type: str = "full-body front",
    subject: ReferenceSet | None = None,
    product: ReferenceSet | None = None,
    style: ReferenceSet | None = None,
) -> GenerationInput:
    return GenerationInput(
        width, height, seed, steps, prompt, "", shot_type, subject, product, style
    )


def _render(spec: GenerationInput, **kwargs: int) -> RenderedImage:
    return render_generation(spec, lambda _: None, **kwargs)


def _pixels(result: RenderedImage) -> npt.NDArray[np.int16]:
    with Image.open(io.BytesIO(result.data)) as img:
        assert img.format == "PNG"
        assert img.mode == "RGB"
        return np.asarray(img, dtype=np.int16)


def _red_fraction(result: RenderedImage) -> float:
    px = _pixels(result)
    red = (px[..., 0] > 150) & (px[..., 1] < 90) & (px[..., 2] < 90)
    return float(red.mean())


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its (tiny) data does not have."""
    data = bytearray(_encode(Image.new("RGB", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


SUBJECT = ReferenceSet("model", (_subject_png(),), 1.0)
PRODUCT = ReferenceSet("red dress", (_product_png(),), 1.0)


@pytest.mark.parametrize(("width", "height"), [(64, 64), (512, 768), (1024, 1024)])
def test_output_is_png_of_requested_size(width: int, height: int) -> None:
    spec = _spec(width=width, height=height, subject=SUBJECT, product=PRODUCT)
    result = _render(spec)
    assert result.mime_type == "image/png"
    assert (result.width, result.height) == (width, height)
    assert _pixels(result).shape == (height, width, 3)


def test_same_input_gives_identical_bytes() -> None:
    spec = _spec(subject=SUBJECT, product=PRODUCT, style=ReferenceSet("s", (_style_png(),), 1))
    assert _render(spec).data == _render(spec).data


def test_different_seed_or_prompt_gives_different_bytes() -> None:
    base = _render(_spec(seed=1, product=PRODUCT)).data
    assert _render(_spec(seed=2, product=PRODUCT)).data != base
    assert _render(_spec(seed=1, product=PRODUCT, prompt="another prompt")).data != base


def test_product_reference_shows_up_only_when_given() -> None:
    with_product = _red_fraction(_render(_spec(subject=SUBJECT, product=PRODUCT)))
    without_product = _red_fraction(_render(_spec(subject=SUBJECT)))
    assert with_product > 0.03
    assert without_product < 0.001


def test_plain_reference_background_is_segmented_away() -> None:
    green_bg = ReferenceSet("dress", (_product_png(background=(0, 200, 0)),), 1.0)
    px = _pixels(_render(_spec(product=green_bg)))
    green = (px[..., 1] > 150) & (px[..., 0] < 80) & (px[..., 2] < 80)
    assert float(green.mean()) < 0.002
    assert _red_fraction(_render(_spec(product=green_bg))) > 0.05


def test_transparent_reference_uses_its_alpha() -> None:
    img = Image.new("RGBA", (100, 100), (0, 0, 255, 0))
    ImageDraw.Draw(img).ellipse([10, 10, 90, 90], fill=(220, 20, 20, 255))
    px = _pixels(_render(_spec(product=ReferenceSet("bag", (_encode(img),), 1.0))))
    blue = (px[..., 2] > 150) & (px[..., 0] < 80) & (px[..., 1] < 80)
    assert float(blue.mean()) < 0.002


def test_close_up_product_fills_more_than_full_body() -> None:
    full = _red_fraction(_render(_spec(shot_type="Full Body", subject=SUBJECT, product=PRODUCT)))
    close = _red_fraction(_render(_spec(shot_type="close-up detail", product=PRODUCT)))
    half = _red_fraction(_render(_spec(shot_type="upper body", subject=SUBJECT, product=PRODUCT)))
    assert close > 2 * full
    assert close > 0.3
    assert half > full


def test_lora_weight_controls_expression() -> None:
    weak = ReferenceSet("red dress", PRODUCT.images, 0.2)
    assert _red_fraction(_render(_spec(product=weak))) < _red_fraction(
        _render(_spec(product=PRODUCT))
    )


def test_style_reference_drives_backdrop() -> None:
    style = ReferenceSet("cobalt", (_style_png(),), 1.5)
    plain = _pixels(_render(_spec(product=PRODUCT)))
    styled = _pixels(_render(_spec(product=PRODUCT, style=style)))
    corner = (slice(0, 30), slice(0, 30))
    assert styled[corner][..., 2].mean() - styled[corner][..., 0].mean() > 30
    assert abs(plain[corner][..., 2].mean() - plain[corner][..., 0].mean()) < 15


def test_placeholders_when_entities_have_no_images() -> None:
    spec = _spec(subject=ReferenceSet("Anna", (), 1.0), product=ReferenceSet("Shirt", (), 1.0))
    px = _pixels(_render(spec))
    assert px.std() > 20
    assert _pixels(_render(_spec())).std() > 10


def test_progress_is_increasing_and_ends_at_one() -> None:
    seen: list[float] = []
    render_generation(_spec(steps=25, subject=SUBJECT, product=PRODUCT), seen.append)
    assert len(seen) >= 5
    assert all(0.0 < v <= 1.0 for v in seen)
    assert all(a < b for a, b in itertools.pairwise(seen))
    assert seen[-1] == 1.0


@pytest.mark.parametrize("declared", [(8000, 6000), (100_000, 100_000)])
def test_oversized_reference_is_a_validation_error(declared: tuple[int, int]) -> None:
    huge = ReferenceSet("huge", (_png_declaring(*declared),), 1.0)
    with pytest.raises(ProcessorError) as info:
        _render(_spec(product=huge))
    assert info.value.category == "validation"


def test_max_input_pixels_is_respected() -> None:
    with pytest.raises(ProcessorError) as info:
        _render(_spec(width=64, height=64, product=PRODUCT), max_input_pixels=10_000)
    assert info.value.category == "validation"


@pytest.mark.parametrize("blob", [b"", b"not an image at all", _product_png()[:60]])
def test_undecodable_reference_is_a_validation_error(blob: bytes) -> None:
    with pytest.raises(ProcessorError) as info:
        _render(_spec(subject=ReferenceSet("bad", (blob,), 1.0)))
    assert info.value.category == "validation"


def test_invalid_output_size_is_a_validation_error() -> None:
    with pytest.raises(ProcessorError) as info:
        _render(_spec(width=0))
    assert info.value.category == "validation"
