"""The local CPU processors of the image and video task types, measured on real bytes.

EDITING, DETAIL_ENHANCER, REFINE, VIDEO_GENERATION, BACKGROUND_FIX, IMAGE_ADJUSTER and
FACE_ENHANCER, each run through ``default_registry()`` with a dict-backed resolver.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import struct
import zlib
from pathlib import Path
from typing import Any

import cv2
import imageio_ffmpeg
import numpy as np
import numpy.typing as npt
import pytest
from helpers import read_mp4
from PIL import Image, ImageDraw, ImageFilter

from scripts.faces import face_image, no_face_image
from server.compute.base import OutputFile
from server.compute.processors.face import FACE_MARGIN, detect_faces
from server.compute.processors.imaging import decode_input
from server.compute.processors.tasks import SEED_FREE, default_registry
from server.compute.registry import ProcessorContext, ProcessorError
from server.domain.enums import TaskType
from server.domain.sizes import refine_output_size

I16 = npt.NDArray[np.int16]
F64 = npt.NDArray[np.float64]
LUMA = np.array([0.299, 0.587, 0.114])


# ---------------------------------------------------------------- helpers


class Inputs:
    """A dict-backed artifact store handing out "artifact:<sha256>" references."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def add(self, data: bytes) -> str:
        uri = f"artifact:{hashlib.sha256(data).hexdigest()}"
        self.blobs[uri] = data
        return uri

    def resolve(self, uri: str) -> bytes:
        try:
            return self.blobs[uri]
        except KeyError:
            raise FileNotFoundError(uri) from None


def _ctx(inputs: Inputs, max_pixels: int = 10**7) -> tuple[ProcessorContext, list[float]]:
    seen: list[float] = []
    return ProcessorContext(inputs.resolve, seen.append, max_pixels), seen


def _run(
    task: TaskType, params: dict[str, Any], inputs: Inputs, max_pixels: int = 10**7
) -> tuple[OutputFile, list[float]]:
    ctx, seen = _ctx(inputs, max_pixels)
    outputs = default_registry().get(task)(params, ctx)
    assert len(outputs) == 1
    return outputs[0], seen


def _encode(img: Image.Image, fmt: str = "PNG", **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def _pixels(out: OutputFile) -> I16:
    assert out.mime_type == "image/png"
    with Image.open(io.BytesIO(out.data)) as img:
        assert img.format == "PNG"
        assert (img.width, img.height) == (out.width, out.height)
        return np.asarray(img, dtype=np.int16)


def _arr(img: Image.Image) -> I16:
    return np.asarray(img, dtype=np.int16)


def _luma(px: I16 | F64) -> F64:
    return np.asarray(px[..., :3] @ LUMA, dtype=np.float64)


def _high_freq(px: I16) -> float:
    """Variance of the Laplacian of the luma: fine texture energy."""
    lap = cv2.Laplacian(_luma(px).astype(np.float32), cv2.CV_32F)
    return float(np.var(lap))


def _crispness(px: I16) -> float:
    """Fine texture energy relative to the luma variance: rises with sharpening only."""
    return _high_freq(px) / float(_luma(px).var())


def _noise(px: I16, region: tuple[slice, slice]) -> float:
    """Std of the luma minus its 5x5 mean within ``region``: grain."""
    luma = _luma(px).astype(np.float32)
    return float(np.std((luma - cv2.blur(luma, (5, 5)))[region]))


def _colourful(size: int = 96) -> Image.Image:
    """Smooth colour sweeps, every channel in mid range (nothing clips at f = 1.5)."""
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    arr = np.stack([60 + 100 * xs, 70 + 90 * ys, 150 - 90 * xs * ys], axis=-1)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _scene(size: int = 160, seed: int = 0, noise: float = 8.0) -> Image.Image:
    """A red-dressed figure with a skin head in front of a noisy grey gradient wall."""
    rng = np.random.default_rng(seed)
    ys = np.linspace(0.0, 1.0, size)[:, None, None]
    wall = 150 + 40 * ys + rng.normal(0.0, noise, (size, size, 3))
    img = Image.fromarray(np.clip(wall, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([size * 0.42, size * 0.1, size * 0.58, size * 0.3], fill=(225, 190, 160))
    d.rectangle([size * 0.35, size * 0.3, size * 0.65, size * 0.9], fill=(180, 30, 40))
    return img


BODY = (slice(60, 130), slice(66, 94))  # well inside the 160 px scene's dress
CORNERS = (slice(0, 20), slice(0, 20))


def _red(px: I16) -> npt.NDArray[np.bool_]:
    return np.asarray((px[..., 0] > 140) & (px[..., 1] < 70) & (px[..., 2] < 80))


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims a size its (tiny) data does not have."""
    data = bytearray(_encode(Image.new("RGB", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _mp4(tmp_path: Path, frames: list[tuple[int, int, int]], size: tuple[int, int]) -> bytes:
    path = tmp_path / "clip.mp4"
    writer = imageio_ffmpeg.write_frames(
        str(path), size, fps=10, macro_block_size=1, ffmpeg_log_level="error"
    )
    writer.send(None)
    for colour in frames:
        writer.send(np.ascontiguousarray(np.full((size[1], size[0], 3), colour, np.uint8)))
    writer.close()
    return path.read_bytes()


def _spread(px: I16) -> float:
    """Mean per-pixel channel range: how colourful."""
    return float((px.max(axis=-1) - px.min(axis=-1)).mean())


def _increasing(seen: list[float]) -> bool:
    return all(0.0 <= v <= 1.0 for v in seen) and all(a <= b for a, b in itertools.pairwise(seen))


# ---------------------------------------------------------------- decode_input


def test_decode_input_png_modes() -> None:
    rgb = decode_input(_encode(Image.new("RGB", (8, 6), (1, 2, 3))), 10**6)
    assert (rgb.mode, rgb.size) == ("RGB", (8, 6))
    rgba = decode_input(_encode(Image.new("RGBA", (8, 6), (1, 2, 3, 40))), 10**6)
    assert rgba.mode == "RGBA"
    assert rgba.getpixel((0, 0)) == (1, 2, 3, 40)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30, 200, 0, 0])
    pal.info["transparency"] = 0
    assert decode_input(_encode(pal), 10**6).mode == "RGBA"
    grey16 = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    assert decode_input(_encode(grey16), 10**6).getpixel((0, 0)) == (255, 255, 255)


def test_decode_input_jpeg_applies_exif_orientation() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    out = decode_input(_encode(img, "JPEG", exif=exif, quality=95), 10**6)
    assert out.size == (20, 40)
    px = _arr(out)
    assert px[5, 10, 0] > 200  # the red half is now on top
    assert px[5, 10, 2] < 60
    assert px[35, 10, 2] > 200


def test_decode_input_webp() -> None:
    out = decode_input(
        _encode(Image.new("RGB", (10, 12), (0, 200, 0)), "WEBP", lossless=True), 10**6
    )
    assert out.size == (10, 12)
    assert _arr(out)[5, 5].tolist() == [0, 200, 0]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decode_input_refuses_too_many_pixels(fmt: str) -> None:
    data = _encode(Image.new("RGB", (50, 50)), fmt)
    with pytest.raises(ProcessorError) as info:
        decode_input(data, 2499)
    assert info.value.category == "validation"


@pytest.mark.parametrize("declared", [(8000, 6000), (100_000, 100_000)])
def test_decode_input_checks_the_header_before_decoding(declared: tuple[int, int]) -> None:
    with pytest.raises(ProcessorError) as info:
        decode_input(_png_declaring(*declared), 40_000_000)
    assert info.value.category == "validation"


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"not an image",
        _encode(Image.effect_noise((64, 64), 60).convert("RGB"))[:2000],  # cut in its IDAT
        _encode(Image.new("RGB", (8, 8)), "GIF"),
        _encode(Image.new("RGB", (8, 8)), "BMP"),
        b"\0\0\0\x18ftypmp42" + b"\0" * 64,  # claims MP4, is not
        b"\0\0\0\x18ftypavif" + b"\0" * 64,  # an ISO-BMFF image format, not MP4
    ],
)
def test_decode_input_refuses_other_or_broken_data(blob: bytes) -> None:
    with pytest.raises(ProcessorError) as info:
        decode_input(blob, 10**6)
    assert info.value.category == "validation"


def test_decode_input_refuses_iso_media_images_without_running_ffmpeg() -> None:
    with pytest.raises(ProcessorError) as info:
        decode_input(b"\0\0\0\x18ftypavif" + b"\0" * 64, 10**6)
    assert info.value.category == "validation"
    assert "unsupported input file type 'avif'" in str(info.value)


def test_decode_input_takes_the_first_video_frame(tmp_path: Path) -> None:
    data = _mp4(tmp_path, [(220, 30, 30), (30, 220, 30), (30, 30, 220)], (48, 32))
    first = decode_input(data, 10**6)
    assert (first.mode, first.size) == ("RGB", (48, 32))
    r, g, b = _arr(first)[16, 24]
    assert r > 180
    assert max(g, b) < 80
    with pytest.raises(ProcessorError) as info:
        decode_input(data, 48 * 32 - 1)
    assert info.value.category == "validation"
    assert "48x32" in str(info.value)  # refused from the stream header, before decoding


# ---------------------------------------------------------------- registry, shared checks


def test_default_registry_has_every_task_type() -> None:
    registry = default_registry()
    for task_type in TaskType:
        assert callable(registry.get(task_type))


def _params_for(task: TaskType, inputs: Inputs) -> dict[str, Any]:
    base = inputs.add(_encode(face_image(128, 128)))
    ref = inputs.add(_encode(_ref_image((230, 0, 230))))
    table: dict[TaskType, dict[str, Any]] = {
        TaskType.EDITING: {
            "base_image": base,
            "reference_images": [ref],
            "subject": None,
            "product": None,
            "tool": "EDIT",
            "width": 0,
            "height": 0,
            "prompt": "",
        },
        TaskType.DETAIL_ENHANCER: {"base_image": base, "strength": 0.7},
        TaskType.REFINE: {
            "base_image": base,
            "target_width": 0,
            "target_height": 0,
            "upscale_enabled": True,
            "upscale_factor": 1.5,
            "upscale_steps": 2,
            "upscale_denoise": 0.3,
            "face_detail_enabled": True,
            "face_detail_steps": 3,
        },
        TaskType.VIDEO_GENERATION: {
            "base_image": base,
            "motion_bucket_id": 127,
            "fps": 8,
            "duration_s": 0.5,
        },
        TaskType.BACKGROUND_FIX: {
            "base_image": base,
            "background_prompt": "beige gradient",
            "background_image": "",
            "mask_expansion": 4,
        },
        TaskType.IMAGE_ADJUSTER: {
            "base_image": base,
            "brightness": 0.1,
            "contrast": 0.2,
            "saturation": -0.3,
            "prompt": "warmer",
        },
        TaskType.FACE_ENHANCER: {"base_image": base, "strength": 0.8, "prompt": ""},
    }
    return {**table[task], "seed": 11}


NEW_TASKS = [t for t in TaskType if t is not TaskType.GENERATION]


@pytest.mark.parametrize("task", NEW_TASKS)
def test_same_params_and_inputs_give_identical_bytes(task: TaskType) -> None:
    inputs = Inputs()
    params = _params_for(task, inputs)
    first, seen = _run(task, params, inputs)
    second, _ = _run(task, params, inputs)
    assert first.data == second.data
    assert first.seed == 11
    assert seen
    assert _increasing(seen)


@pytest.mark.parametrize("task", NEW_TASKS)
def test_the_seed_free_declaration_is_true(task: TaskType) -> None:
    # SEED_FREE lets the AGENTIC loop skip an attempt that would differ by its seed only.
    inputs = Inputs()
    params = _params_for(task, inputs)
    first, _ = _run(task, params, inputs)
    other, _ = _run(task, {**params, "seed": 12345}, inputs)
    assert (first.data == other.data) == (task in SEED_FREE)


@pytest.mark.parametrize("task", NEW_TASKS)
def test_bad_base_image_is_a_validation_error(task: TaskType) -> None:
    inputs = Inputs()
    params = _params_for(task, inputs)
    for bad in (inputs.add(b"garbage"), inputs.add(_png_declaring(9000, 9000)), "artifact:nope"):
        with pytest.raises(ProcessorError) as info:
            _run(task, {**params, "base_image": bad}, inputs)
        assert info.value.category == "validation"


@pytest.mark.parametrize("task", NEW_TASKS)
def test_input_over_max_input_pixels_is_refused(task: TaskType) -> None:
    inputs = Inputs()
    with pytest.raises(ProcessorError) as info:
        _run(task, _params_for(task, inputs), inputs, max_pixels=128 * 128 - 1)
    assert info.value.category == "validation"


# ---------------------------------------------------------------- IMAGE_ADJUSTER


def _adjust(img: Image.Image, **values: Any) -> I16:
    inputs = Inputs()
    params = {"base_image": inputs.add(_encode(img)), "prompt": "", "seed": 3, **values}
    out, _ = _run(TaskType.IMAGE_ADJUSTER, params, inputs)
    return _pixels(out)


def test_brightness_multiplies_every_channel() -> None:
    img = _colourful()
    src = _arr(img)
    brighter = _adjust(img, brightness=0.5)
    assert _luma(brighter).mean() > _luma(src).mean() + 20
    assert np.abs(brighter - np.clip(np.round(src * 1.5), 0, 255)).max() <= 1
    assert (_adjust(img, brightness=-1.0) == 0).all()
    doubled = _adjust(img, brightness=1.0)
    assert np.abs(doubled - np.clip(src * 2, 0, 255)).max() <= 1


def test_contrast_blends_with_the_mean_grey() -> None:
    img = _colourful()
    src = _arr(img)
    flat = _adjust(img, contrast=-1.0)
    mean = _luma(src).mean()
    assert flat.max() - flat.min() <= 1
    assert abs(float(flat.mean()) - mean) <= 1.0
    more = _adjust(img, contrast=0.5)
    assert np.abs(more - np.clip(mean + 1.5 * (src - mean), 0, 255)).max() <= 1
    assert more.std() > src.std() * 1.4


def test_saturation_blends_with_the_luma_greyscale() -> None:
    img = _colourful()
    src = _arr(img)
    grey = _adjust(img, saturation=-1.0)
    assert (grey.max(axis=-1) - grey.min(axis=-1)).max() <= 1
    assert np.abs(grey[..., 1] - np.round(_luma(src))).max() <= 1
    vivid = _adjust(img, saturation=1.0)
    assert _spread(vivid) > 1.6 * _spread(src)


def test_prompt_hints() -> None:
    img = _colourful()
    src = _arr(img)

    def rb(px: I16) -> float:
        return float(px[..., 0].mean() / px[..., 2].mean())

    assert rb(_adjust(img, prompt="Make it WARMER please")) > rb(src) * 1.1
    assert rb(_adjust(img, prompt="cooler")) < rb(src) / 1.1
    hinted = _adjust(img, prompt="a bit brighter")
    assert np.array_equal(hinted, _adjust(img, brightness=0.2))
    assert _luma(_adjust(img, prompt="darker")).mean() < _luma(src).mean() - 10
    assert _adjust(img, prompt="more contrast").std() > src.std() * 1.15
    assert _adjust(img, prompt="less contrast").std() < src.std() * 0.85
    muted = _adjust(img, prompt="muted")
    assert np.array_equal(muted, _adjust(img, saturation=-0.2))
    assert np.array_equal(_adjust(img, prompt="vivid"), _adjust(img, saturation=0.2))


def test_prompt_hints_apply_before_the_values() -> None:
    img = _colourful()
    # Hints first: the warm shift is then removed by full desaturation (not the reverse).
    out = _adjust(img, prompt="warmer", saturation=-1.0)
    assert (out.max(axis=-1) - out.min(axis=-1)).max() <= 1


def test_adjuster_keeps_alpha() -> None:
    img = _colourful().convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 96).astype(np.uint8), (96, 1))
    img.putalpha(Image.fromarray(alpha))
    out = _adjust(img, brightness=0.3)
    assert out.shape[-1] == 4
    assert np.array_equal(out[..., 3], alpha)


def test_gamma_lifts_the_shadows_and_keeps_black_and_white() -> None:
    ramp = np.tile(np.linspace(0, 255, 96).astype(np.uint8), (96, 1))
    img = Image.fromarray(np.stack([ramp] * 3, axis=-1))
    src = _arr(img)
    lifted = _adjust(img, gamma=2.0)
    expected = np.round(255 * (src / 255) ** 0.5)
    assert np.abs(lifted - expected).max() <= 1
    assert (lifted[:, 0] == 0).all()
    assert (lifted[:, -1] == 255).all()
    assert _luma(_adjust(img, gamma=0.5)).mean() < _luma(src).mean() - 30
    assert np.array_equal(_adjust(img, gamma=1.0), src)  # 1 is neutral
    # Gamma after brightness: x2 then gamma 2 is sqrt(min(1, 2x)).
    both = _adjust(img, brightness=1.0, gamma=2.0)
    assert np.abs(both - np.round(255 * np.minimum(1.0, 2 * src / 255) ** 0.5)).max() <= 1


def test_adjuster_values_out_of_range_are_validation_errors() -> None:
    for key, value in (
        ("brightness", 1.5),
        ("contrast", -2.0),
        ("saturation", float("nan")),
        ("gamma", 0.1),
        ("gamma", 5.0),
        ("gamma", "bright"),
    ):
        with pytest.raises(ProcessorError) as info:
            _adjust(_colourful(), **{key: value})
        assert info.value.category == "validation"


# ---------------------------------------------------------------- DETAIL_ENHANCER


def _texture(size: int = 128) -> Image.Image:
    rng = np.random.default_rng(5)
    ys, xs = np.mgrid[0:size, 0:size]
    weave = 25 * np.sin(xs * 0.9) * np.sin(ys * 0.7) + rng.normal(0, 6, (size, size))
    base = np.stack([120 + weave, 90 + weave, 70 + 0.5 * weave], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(0.8))


def _detail(img: Image.Image, strength: float | None) -> OutputFile:
    inputs = Inputs()
    params: dict[str, Any] = {"base_image": inputs.add(_encode(img)), "seed": 1}
    if strength is not None:
        params["strength"] = strength
    return _run(TaskType.DETAIL_ENHANCER, params, inputs)[0]


def test_detail_enhancer_boosts_fine_texture_with_strength() -> None:
    img = _texture()
    src = _arr(img)
    outs = {s: _pixels(_detail(img, s)) for s in (0.0, 0.5, 1.0)}
    assert np.array_equal(outs[0.0], src)
    assert outs[0.5].shape == src.shape
    energy = [_high_freq(outs[s]) for s in (0.0, 0.5, 1.0)]
    assert energy[1] > 1.5 * energy[0]
    assert energy[2] > 1.3 * energy[1]
    assert abs(float(outs[1.0].mean()) - float(src.mean())) < 2.0  # no global shift
    assert np.array_equal(_pixels(_detail(img, None)), outs[0.5])  # default strength 0.5


# ---------------------------------------------------------------- REFINE


def _refine(img: Image.Image, **params: Any) -> tuple[OutputFile, list[float]]:
    inputs = Inputs()
    full = {
        "base_image": inputs.add(_encode(img)),
        "target_width": 0,
        "target_height": 0,
        "upscale_enabled": True,
        "upscale_factor": 2.0,
        "upscale_steps": 2,
        "upscale_denoise": 0.0,
        "face_detail_enabled": False,
        "face_detail_steps": 0,
        "seed": 4,
        **params,
    }
    return _run(TaskType.REFINE, full, inputs)


@pytest.mark.parametrize(
    ("target", "upscale", "factor"),
    [
        ((0, 0), True, 2.0),
        ((0, 0), True, 1.37),
        ((200, 0), True, 2.0),
        ((0, 72), False, 1.0),
        ((96, 40), True, 3.0),
        ((0, 0), False, 2.0),
    ],
)
def test_refine_outputs_exactly_the_derived_size(
    target: tuple[int, int], upscale: bool, factor: float
) -> None:
    img = _texture(100).resize((100, 60))
    out, _ = _refine(
        img,
        target_width=target[0],
        target_height=target[1],
        upscale_enabled=upscale,
        upscale_factor=factor,
    )
    expected = refine_output_size(
        100,
        60,
        target_width=target[0],
        target_height=target[1],
        upscale_enabled=upscale,
        upscale_factor=factor,
    )
    assert (out.width, out.height) == expected
    assert _pixels(out).shape[:2] == (expected[1], expected[0])


def test_refine_over_max_side_is_a_validation_error() -> None:
    with pytest.raises(ProcessorError) as info:
        _refine(Image.new("RGB", (64, 64)), target_width=4104)
    assert info.value.category == "validation"


def test_refine_reports_progress_per_stage() -> None:
    _, few = _refine(_texture(64), upscale_steps=1)
    _, many = _refine(_texture(64), upscale_steps=5)
    assert len(many) >= len(few) + 4
    assert _increasing(many)


def test_refine_denoise_removes_grain() -> None:
    rng = np.random.default_rng(2)
    flat = np.clip(128 + rng.normal(0, 10, (80, 80, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(flat)
    inner = (slice(10, 150), slice(10, 150))
    noisy = _noise(_pixels(_refine(img, upscale_denoise=0.0)[0]), inner)
    clean = _noise(_pixels(_refine(img, upscale_denoise=1.0)[0]), inner)
    assert clean < 0.6 * noisy


def _face_box(img: Image.Image) -> tuple[int, int, int, int]:
    faces = detect_faces(np.asarray(img.convert("RGB")))
    assert len(faces) == 1
    return faces[0]


def _outside(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    x, y, w, h = box
    mx, my = int(np.ceil(FACE_MARGIN * w)), int(np.ceil(FACE_MARGIN * h))
    keep = np.ones(shape[:2], np.bool_)
    keep[max(0, y - my) : y + h + my, max(0, x - mx) : x + w + mx] = False
    return keep


def test_refine_face_detail_changes_only_the_face() -> None:
    img = face_image(160, 160)
    src = _arr(img)
    box = _face_box(img)
    out, seen = _refine(img, upscale_enabled=False, face_detail_enabled=True, face_detail_steps=6)
    px = _pixels(out)
    assert px.shape == src.shape
    outside = _outside(box, src.shape)
    assert np.array_equal(px[outside], src[outside])
    x, y, w, h = box
    assert np.abs(px - src)[y : y + h, x : x + w].mean() > 0.5
    assert len(seen) >= 6
    assert out.notes == ()


def test_refine_face_detail_without_a_face_says_so() -> None:
    out, _ = _refine(no_face_image(96, 96), upscale_enabled=False, face_detail_enabled=True)
    assert out.notes == ("no face detected; face detail skipped",)


# ---------------------------------------------------------------- VIDEO_GENERATION


def _video(img: Image.Image, **params: Any) -> tuple[OutputFile, list[float]]:
    inputs = Inputs()
    full = {
        "base_image": inputs.add(_encode(img)),
        "motion_bucket_id": 127,
        "fps": 12,
        "duration_s": 1.5,
        "seed": 9,
        **params,
    }
    return _run(TaskType.VIDEO_GENERATION, full, inputs)


def _frame_motion(frames: list[I16]) -> float:
    return float(np.abs(frames[0] - frames[-1]).mean())


def test_video_has_exactly_fps_times_duration_frames_and_moves(tmp_path: Path) -> None:
    img = face_image(129, 97)  # odd sides: cropped to even
    out, seen = _video(img)
    assert (out.mime_type, out.width, out.height) == ("video/mp4", 128, 96)
    assert (out.frame_count, out.duration_s, out.seed) == (18, 1.5, 9)
    meta, frames = read_mp4(out.data, tmp_path)
    assert tuple(meta["size"]) == (128, 96)
    assert meta["codec"].startswith("h264")
    assert len(frames) == 18
    assert _frame_motion(frames) > 3.0
    steps = [float(np.abs(a - b).mean()) for a, b in itertools.pairwise(frames)]
    assert sum(s > 0.05 for s in steps) >= 12  # motion spread over the clip, not one jump
    assert len(seen) >= 10
    assert _increasing(seen)


def test_video_motion_grows_with_motion_bucket(tmp_path: Path) -> None:
    img = face_image(96, 96)
    calm = read_mp4(_video(img, motion_bucket_id=1, fps=6, duration_s=1.0)[0].data, tmp_path)
    wild = read_mp4(_video(img, motion_bucket_id=255, fps=6, duration_s=1.0)[0].data, tmp_path)
    assert len(calm[1]) == len(wild[1]) == 6
    assert _frame_motion(wild[1]) > 3 * _frame_motion(calm[1])


def test_video_direction_follows_the_seed() -> None:
    img = face_image(96, 96)
    one = _video(img, fps=4, duration_s=1.0, seed=1)[0]
    assert _video(img, fps=4, duration_s=1.0, seed=1)[0].data == one.data
    assert _video(img, fps=4, duration_s=1.0, seed=2)[0].data != one.data


def test_video_single_frame_and_bad_settings(tmp_path: Path) -> None:
    out, _ = _video(face_image(64, 64), fps=1, duration_s=0.5)
    assert out.frame_count == 1
    assert len(read_mp4(out.data, tmp_path)[1]) == 1
    for bad in ({"fps": 61}, {"duration_s": 31.0}, {"duration_s": 0.2}, {"motion_bucket_id": 256}):
        with pytest.raises(ProcessorError) as info:
            _video(face_image(64, 64), **bad)
        assert info.value.category == "validation"


class _CancelledError(Exception):
    pass


def test_video_cancellation_stops_between_frames() -> None:
    inputs = Inputs()
    params = {
        "base_image": inputs.add(_encode(face_image(64, 64))),
        "motion_bucket_id": 127,
        "fps": 30,
        "duration_s": 30.0,
        "seed": 1,
    }
    calls: list[float] = []

    def progress(value: float) -> None:
        calls.append(value)
        if len(calls) > 3:
            raise _CancelledError

    ctx = ProcessorContext(inputs.resolve, progress, 10**7)
    with pytest.raises(_CancelledError):
        default_registry().get(TaskType.VIDEO_GENERATION)(params, ctx)
    assert len(calls) == 4


# ---------------------------------------------------------------- BACKGROUND_FIX


def _bgfix(img: Image.Image, inputs: Inputs | None = None, **params: Any) -> I16:
    inputs = inputs or Inputs()
    full = {
        "base_image": inputs.add(_encode(img)),
        "background_prompt": "",
        "background_image": "",
        "mask_expansion": 0,
        "seed": 5,
        **params,
    }
    return _pixels(_run(TaskType.BACKGROUND_FIX, full, inputs)[0])


def test_background_prompt_colours_the_backdrop_and_keeps_the_person() -> None:
    img = _scene()
    src = _arr(img)
    out = _bgfix(img, background_prompt="blue seamless studio")
    corner = out[CORNERS].reshape(-1, 3).mean(axis=0)
    assert corner[2] > corner[0] + 40  # blue now, grey before
    assert np.abs(out[BODY] - src[BODY]).mean() < 1.0
    assert int(_red(out).sum()) > 0.95 * int(_red(src).sum())
    white = _bgfix(img, background_prompt="plain white")[CORNERS]
    assert white.min() > 220
    unknown = _bgfix(img, background_prompt="something nice")[CORNERS].reshape(-1, 3)
    assert 190 < unknown.mean() < 235  # neutral light grey seamless
    assert np.abs(unknown.mean(axis=0) - unknown.mean()).max() < 6


def test_background_image_replaces_the_background() -> None:
    inputs = Inputs()
    stripes = Image.new("RGB", (300, 200), (250, 220, 0))
    ImageDraw.Draw(stripes).rectangle([0, 100, 300, 200], fill=(0, 160, 60))
    out = _bgfix(_scene(), inputs, background_image=inputs.add(_encode(stripes)))
    top, bottom = out[2:20, 2:20].reshape(-1, 3), out[140:158, 2:20].reshape(-1, 3)
    assert np.abs(top.mean(axis=0) - [250, 220, 0]).max() < 12
    assert np.abs(bottom.mean(axis=0) - [0, 160, 60]).max() < 12
    assert np.abs(out[BODY] - _arr(_scene())[BODY]).mean() < 1.0


def test_background_clean_evens_out_and_denoises() -> None:
    img = _scene(noise=14.0)
    src = _arr(img)
    out = _bgfix(img)
    wall = (slice(0, 160), slice(0, 30))
    assert _noise(out, wall) < 0.25 * _noise(src, wall)
    # evened out, yet the wall keeps its colour and top-to-bottom fall-off
    assert abs(float(out[wall].mean()) - float(src[wall].mean())) < 4
    assert out[140:158, 0:30].mean() > out[2:20, 0:30].mean() + 20
    assert np.abs(out[BODY] - src[BODY]).mean() < 1.0


def test_mask_expansion_grows_the_kept_area() -> None:
    img = _scene()
    src = _arr(img)

    def kept(px: I16) -> int:
        return int((np.abs(px - src).max(axis=-1) <= 2).sum())

    areas = [kept(_bgfix(img, background_prompt="black", mask_expansion=e)) for e in (0, 6, 14)]
    assert areas[0] < areas[1] < areas[2]
    assert areas[2] - areas[0] > 1500


def test_background_fix_uses_real_transparency() -> None:
    # Same colour everywhere: only the alpha channel tells the subject from the rest.
    cut = Image.new("RGBA", (96, 96), (200, 20, 120, 0))
    ImageDraw.Draw(cut).ellipse([28, 18, 68, 88], fill=(200, 20, 120, 255))
    out = _bgfix(cut, background_prompt="green")
    assert out.shape == (96, 96, 3)
    assert out[48, 48].tolist() == [200, 20, 120]
    r, g, b = out[3:12, 3:12].reshape(-1, 3).mean(axis=0)
    assert g > max(r, b) + 20


def test_background_fix_mask_expansion_bound() -> None:
    with pytest.raises(ProcessorError):
        _bgfix(_scene(64), mask_expansion=257)


# ---------------------------------------------------------------- EDITING


def _ref_image(colour: tuple[int, int, int], shape: str = "ellipse") -> Image.Image:
    img = Image.new("RGB", (120, 120), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "ellipse" else draw.rectangle)([20, 20, 100, 100], fill=colour)
    return img


def _edit_base(size: int = 192) -> Image.Image:
    """A blue figure in the middle of a plain warm-grey studio."""
    img = Image.new("RGB", (size, size), (200, 195, 185))
    d = ImageDraw.Draw(img)
    d.ellipse([size * 0.43, size * 0.12, size * 0.57, size * 0.27], fill=(225, 190, 160))
    d.rectangle([size * 0.38, size * 0.27, size * 0.62, size * 0.92], fill=(30, 50, 160))
    return img


def _edit(inputs: Inputs, **params: Any) -> OutputFile:
    full = {
        "base_image": inputs.add(_encode(_edit_base())),
        "reference_images": [],
        "subject": None,
        "product": None,
        "tool": "EDIT",
        "width": 0,
        "height": 0,
        "seed": 21,
        "prompt": "",
        **params,
    }
    return _run(TaskType.EDITING, full, inputs)[0]


def _near(px: I16, colour: tuple[int, int, int], tol: int = 40) -> npt.NDArray[np.bool_]:
    return np.asarray(np.abs(px[..., :3] - np.array(colour)).max(axis=-1) < tol)


def _blue(px: I16) -> npt.NDArray[np.bool_]:
    return _near(px, (30, 50, 160))


def test_edit_composites_every_reference_visibly_in_free_space() -> None:
    inputs = Inputs()
    magenta, yellow = (230, 0, 230), (250, 210, 0)
    refs = [inputs.add(_encode(_ref_image(magenta))), inputs.add(_encode(_ref_image(yellow, "r")))]
    base = _arr(_edit_base())
    out = _edit(inputs, reference_images=refs)
    px = _pixels(out)
    for colour in (magenta, yellow):
        assert not _near(base, colour).any()
        assert _near(px, colour).mean() > 0.03
    assert _blue(px).sum() > 0.9 * _blue(base).sum()  # placed beside, not over, the figure
    assert not _near(px, (255, 255, 255), 8).any()  # reference backdrops were cut away


def test_edit_placement_follows_the_seed_and_output_size() -> None:
    inputs = Inputs()
    refs = [inputs.add(_encode(_ref_image((230, 0, 230))))]

    def centroid(out: OutputFile) -> tuple[float, float]:
        ys, xs = np.nonzero(_near(_pixels(out), (230, 0, 230)))
        return float(xs.mean()), float(ys.mean())

    placed = {centroid(_edit(inputs, reference_images=refs, seed=s)) for s in range(6)}
    assert len(placed) >= 2
    sized = _edit(inputs, reference_images=refs, width=96, height=128)
    assert (sized.width, sized.height) == (96, 128)
    assert _pixels(sized).shape == (128, 96, 3)


def test_edit_prompt_only_applies_colour_hints() -> None:
    inputs = Inputs()
    out = _pixels(_edit(inputs, prompt="make it darker"))
    assert _luma(out).mean() < _luma(_arr(_edit_base())).mean() - 10


def test_subject_swap_replaces_the_person() -> None:
    inputs = Inputs()
    green = Image.new("RGB", (100, 260), (255, 255, 255))
    d = ImageDraw.Draw(green)
    d.ellipse([35, 5, 65, 45], fill=(230, 190, 160))
    d.rectangle([20, 45, 80, 250], fill=(20, 170, 40))
    subject = {"name": "Mia", "images": [inputs.add(_encode(green))], "weight": 1.0}
    base = _arr(_edit_base())
    px = _pixels(_edit(inputs, tool="SUBJECT_SWAP", subject=subject))
    assert _blue(px).sum() < 0.03 * _blue(base).sum()  # the old person is gone
    ys, xs = np.nonzero(_blue(base))
    region = px[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    assert _near(region, (20, 170, 40)).mean() > 0.4  # the subject stands in its place
    assert np.array_equal(px[:, :20], base[:, :20])  # far background untouched


def test_subject_swap_needs_a_subject() -> None:
    with pytest.raises(ProcessorError) as info:
        _edit(Inputs(), tool="SUBJECT_SWAP")
    assert info.value.category == "validation"


def _product_base() -> Image.Image:
    """Grey studio, a striped blue garment and a striped red bag (both foreground)."""
    rng = np.random.default_rng(8)
    img = np.full((160, 160, 3), 205, np.float64)
    xs = np.mgrid[0:160, 0:160][1]
    weave = 18 * np.sin(xs * 0.8) + rng.normal(0, 3, (160, 160))
    blue = (slice(30, 140), slice(40, 95))
    red = (slice(80, 130), slice(100, 130))
    img[blue] = np.stack([40 + weave, 60 + weave, 170 + weave], axis=-1)[blue]
    img[red] = np.stack([175 + weave, 40 + weave, 40 + weave], axis=-1)[red]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def test_product_enhancement_sharpens_only_the_product() -> None:
    inputs = Inputs()
    product = {
        "name": "Blue dress",
        "images": [inputs.add(_encode(_ref_image((40, 60, 170), "r")))],
        "weight": 1.0,
    }
    base_img = _product_base()
    base = _arr(base_img)
    px = _pixels(
        _edit(
            inputs,
            base_image=inputs.add(_encode(base_img)),
            tool="PRODUCT_ENHANCEMENT",
            product=product,
        )
    )
    blue, red = (slice(40, 130), slice(48, 88)), (slice(88, 122), slice(106, 124))
    assert _luma(px[blue]).std() > 1.2 * _luma(base[blue]).std()  # contrast lifted
    # sharpened: fine detail grows relative to the overall variance (contrast alone keeps it)
    assert _crispness(px[blue]) > 1.3 * _crispness(base[blue])
    assert np.abs(px[red] - base[red]).mean() < 0.2 * np.abs(px[blue] - base[blue]).mean()
    assert np.array_equal(px[:15], base[:15])  # background untouched
    # Without a product reference the whole foreground (the red bag too) is enhanced.
    whole = _pixels(
        _edit(inputs, base_image=inputs.add(_encode(base_img)), tool="PRODUCT_ENHANCEMENT")
    )
    assert _luma(whole[red]).std() > 1.1 * _luma(base[red]).std()


def test_unknown_tool_and_too_many_references_are_validation_errors() -> None:
    inputs = Inputs()
    with pytest.raises(ProcessorError):
        _edit(inputs, tool="MAGIC")
    ref = inputs.add(_encode(_ref_image((0, 0, 0))))
    with pytest.raises(ProcessorError):
        _edit(inputs, reference_images=[ref] * 9)


# ---------------------------------------------------------------- FACE_ENHANCER


def _face(img: Image.Image, strength: float = 0.8, prompt: str = "") -> OutputFile:
    inputs = Inputs()
    params = {"base_image": inputs.add(_encode(img)), "strength": strength, "prompt": prompt}
    return _run(TaskType.FACE_ENHANCER, {**params, "seed": 2}, inputs)[0]


def test_face_enhancer_changes_the_face_and_nothing_else() -> None:
    img = face_image(192, 192)
    src = _arr(img)
    box = _face_box(img)
    out = _face(img)
    px = _pixels(out)
    outside = _outside(box, src.shape)
    assert np.array_equal(px[outside], src[outside])
    x, y, w, h = box
    face = (slice(y, y + h), slice(x, x + w))
    assert np.abs(px[face] - src[face]).mean() > 1.0
    assert _luma(px[face]).mean() > _luma(src[face]).mean()  # slightly brightened
    assert out.notes == ()
    weak = _pixels(_face(img, 0.3))
    assert np.abs(weak[face] - src[face]).mean() < np.abs(px[face] - src[face]).mean()


def test_face_enhancer_strength_zero_is_unchanged() -> None:
    img = face_image(128, 128)
    assert np.array_equal(_pixels(_face(img, 0.0)), _arr(img))


def test_face_enhancer_without_a_face_is_unchanged_with_a_note() -> None:
    img = no_face_image(160, 120)
    out = _face(img)
    assert np.array_equal(_pixels(out), _arr(img))
    assert out.notes == ("no face detected; the image is unchanged",)


def test_synthetic_face_is_detected_at_several_sizes() -> None:
    for size, width in ((128, 0.42), (256, 0.3), (320, 0.5)):
        assert len(detect_faces(np.asarray(face_image(size, size, face_width=width)))) == 1
    assert detect_faces(np.asarray(no_face_image(256, 256))) == []
