"""Generic image helpers: decoding, float conversion, masks, cutouts and placeholders."""

from __future__ import annotations

import colorsys
import hashlib
import io
import re
import subprocess
import tempfile
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from server.compute.registry import ProcessorError

F32 = npt.NDArray[np.float32]
U8 = npt.NDArray[np.uint8]

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_BAD_IMAGE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
_INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
_FFMPEG_TIMEOUT_S = 60.0
# Major brands of MP4 files (ISO base media); HEIF/AVIF images share the container.
_MP4_BRANDS = frozenset(
    {
        *(b"isom", b"iso2", b"iso3", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"mp71"),
        *(b"avc1", b"M4V ", b"M4VP", b"dash", b"mmp4", b"MSNV"),
    }
)
# The size in ffmpeg's description of a video stream, e.g. "Video: h264 (High) ..., 1280x720 [".
_VIDEO_SIZE = re.compile(r"Stream #[^\n]*?Video:[^\n]*?[ ,]([1-9]\d{0,5})x([1-9]\d{0,5})\b")
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Placeholder shapes "colour kind x y x y ...;" in percent of the canvas; kind P polygon,
# M polygon plus its mirror image, E ellipse bounding box.
_FIGURE = (
    "legs P 29 50 71 50 68 95 53 95 50 60 47 95 32 95; shoe E 28 93 48 99; shoe E 52 93 72 99;"
    "skin M 21 22 29 23 23 47 13 46; skin E 10 45 24 50; skin E 76 45 90 50; hair E 36 0 64 9;"
    "skin E 39 1 61 13.5; skin P 45 11 55 11 55 17 45 17; main M 50 15.5 36 15.5 21 19.5 26 53;"
    "main P 26 53 74 53 50 15.5; main M 21 19 35 20.5 30 33 15 31.5"
)
_GARMENT = "main M 50 8 35 0 5 14 15 36 24 31 24 100 50 100; trim E 40 -2 60 9"
_FIXED: dict[str, list[tuple[int, int, int]]] = {
    "skin": [(234, 200, 170), (205, 160, 120), (160, 110, 75), (110, 75, 50), (240, 215, 190)],
    "hair": [(60, 45, 35), (25, 22, 20), (140, 100, 60), (200, 170, 110)],
    "shoe": [(35, 32, 30), (90, 60, 40), (220, 220, 215)],
}


def decode(data: bytes, max_pixels: int, side: int) -> Image.Image:
    """Decode to RGBA within side x side; side 0 only checks the header."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise ProcessorError("validation", f"reference image {img.size} is too large")
            if side <= 0:
                return img
            img.draft(None, (side, side))
            img.load()
            out = ImageOps.exif_transpose(img).convert("RGBA")
    except (*_BAD_IMAGE, Image.DecompressionBombWarning) as exc:
        raise ProcessorError("validation", f"undecodable reference image: {exc}") from exc
    out.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return out


def decode_input(data: bytes, max_pixels: int) -> Image.Image:
    """Decode a task's input image: PNG, JPEG, WebP or the first frame of an MP4 video.

    The pixel count is checked from the header (or the video stream's metadata) before any
    pixel is decoded, so an oversized input costs nothing. JPEG (and any EXIF carrying)
    images are turned upright by their EXIF orientation.

    Args:
        data: The encoded bytes.
        max_pixels: Largest accepted width x height.

    Returns:
        A loaded image of mode "RGBA" when the input carries transparency, else "RGB".

    Raises:
        ProcessorError: With category "validation" for another format, undecodable data or
            more than ``max_pixels`` pixels.
    """
    if data[4:8] == b"ftyp":  # ISO base media file: MP4, but also HEIF/AVIF images
        if data[8:12] not in _MP4_BRANDS:
            brand = data[8:12].decode("ascii", "replace")
            raise ProcessorError("validation", f"unsupported input file type {brand!r}")
        return _first_video_frame(data, max_pixels)
    try:
        with Image.open(io.BytesIO(data), formats=_INPUT_FORMATS) as img:
            if img.width * img.height > max_pixels:
                raise ProcessorError(
                    "validation", f"input image {img.width}x{img.height} has too many pixels"
                )
            img.load()
            upright = ImageOps.exif_transpose(img)
    except (*_BAD_IMAGE, Image.DecompressionBombWarning) as exc:
        raise ProcessorError(
            "validation", f"undecodable input image (PNG, JPEG, WebP or MP4 expected): {exc}"
        ) from exc
    if upright.mode in _WIDE_GREY:
        grey = np.asarray(upright, dtype=np.float64)
        scale = 255.0 / 65535.0 if float(grey.max(initial=0.0)) > 255.0 else 1.0
        upright = Image.fromarray(np.clip(grey * scale + 0.5, 0, 255).astype(np.uint8))
    return upright.convert("RGBA" if upright.has_transparency_data else "RGB")


def _first_video_frame(data: bytes, max_pixels: int) -> Image.Image:
    """The first frame of a video, decoded by imageio-ffmpeg's bundled ffmpeg.

    ffmpeg first only reads the stream headers (the frame size is checked), then decodes
    exactly one frame to an 8-bit RGB PNG on its stdout; both runs are time limited.
    """
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    with tempfile.TemporaryDirectory(prefix="sartiq-input-") as tmp:
        path = Path(tmp) / "input.mp4"
        path.write_bytes(data)
        probe = _ffmpeg([exe, "-hide_banner", "-nostdin", "-i", str(path)])
        found = _VIDEO_SIZE.search(probe.stderr.decode("utf-8", "replace"))
        if found is None:
            raise ProcessorError("validation", "undecodable input video: no video stream")
        width, height = int(found[1]), int(found[2])
        if width * height > max_pixels:
            raise ProcessorError(
                "validation", f"input video frame {width}x{height} has too many pixels"
            )
        first = [exe, "-v", "error", "-nostdin", "-i", str(path), "-map", "0:v:0"]
        first += ["-frames:v", "1", "-pix_fmt", "rgb24", "-f", "image2pipe", "-c:v", "png", "-"]
        decoded = _ffmpeg(first)
    if decoded.returncode != 0 or not decoded.stdout:
        detail = decoded.stderr.decode("utf-8", "replace").strip()[-300:]
        raise ProcessorError("validation", f"undecodable input video: {detail or 'no frame'}")
    try:
        with Image.open(io.BytesIO(decoded.stdout), formats=("PNG",)) as frame:
            if frame.width * frame.height > max_pixels:
                raise ProcessorError("validation", "input video frame has too many pixels")
            return frame.convert("RGB")
    except _BAD_IMAGE as exc:
        raise ProcessorError("validation", f"undecodable input video frame: {exc}") from exc


def _ffmpeg(cmd: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_FFMPEG_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ProcessorError("validation", "input video took too long to decode") from exc


def encode_png(img: Image.Image) -> bytes:
    """Encode losslessly as PNG (deterministic for the same pixels)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


def split_alpha(img: Image.Image) -> tuple[F32, F32 | None]:
    """RGB as float32 in [0, 1], and the alpha channel when the image has one."""
    arr = to_f32(img.convert("RGBA") if img.mode not in ("RGB", "RGBA") else img)
    if arr.shape[2] == 4:
        return np.ascontiguousarray(arr[..., :3]), np.ascontiguousarray(arr[..., 3])
    return arr, None


def join_alpha(rgb: F32, alpha: F32 | None) -> Image.Image:
    """The inverse of ``split_alpha``: an RGB or RGBA 8-bit image."""
    if alpha is None:
        return Image.fromarray(to_u8(rgb))
    return Image.fromarray(to_u8(np.concatenate([rgb, alpha[..., None]], axis=-1)))


def gaussian(arr: F32, sigma: float) -> F32:
    """Full precision Gaussian blur (reflected borders) of a float image or mask."""
    if sigma <= 0:
        return arr.copy()
    return np.asarray(cv2.GaussianBlur(arr, (0, 0), sigma), dtype=np.float32)


def unsharp_luma(rgb: F32, amount: float, sigma: float) -> F32:
    """Unsharp mask on luminance only: ``amount`` times the luma detail is added to each channel.

    Colours keep their chroma; the result is clipped to [0, 1].
    """
    luma = np.ascontiguousarray(rgb @ LUMA)
    detail = luma - gaussian(luma, sigma)
    out: F32 = np.clip(rgb + amount * detail[..., None], 0.0, 1.0)
    return out.astype(np.float32)


def smoothstep(lo: float, hi: float, x: F32) -> F32:
    """Hermite ramp from 0 at lo to 1 at hi, clamped outside."""
    t: F32 = np.clip((x - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def to_f32(img: Image.Image) -> F32:
    """Image pixels as float32 in [0, 1]."""
    return np.asarray(img, dtype=np.float32) / np.float32(255.0)


def to_u8(arr: F32) -> npt.NDArray[np.uint8]:
    """Float pixels in [0, 1] rounded and clamped to uint8."""
    scaled: F32 = np.clip(arr * 255.0 + 0.5, 0.0, 255.0)
    return scaled.astype(np.uint8)


def blur(arr: F32, radius: float) -> F32:
    """Gaussian blur of a float array via an 8-bit round trip."""
    return to_f32(Image.fromarray(to_u8(arr)).filter(ImageFilter.GaussianBlur(radius)))


def segment(img: Image.Image) -> Image.Image:
    """Cut the foreground out: keep real alpha, else key out a plain border colour."""
    arr = to_f32(img)
    h, w = arr.shape[:2]
    if float(arr[..., 3].min()) < 0.9:
        mask = arr[..., 3]
    else:
        feather = 0.5 + 0.0015 * max(h, w)
        hard = mask_from_border(arr[..., :3])
        arr[..., :3] = bleed(arr, hard > 0.98, 2 * feather + 2)
        mask = blur(hard, feather)
    ys, xs = np.nonzero(mask > 0.04)
    if ys.size == 0:
        mask = card_mask(h, w)
        ys, xs = np.nonzero(mask > 0.04)
    arr[..., 3] = mask
    out = Image.fromarray(to_u8(arr))
    return out.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))


def bleed(arr: F32, solid: npt.NDArray[np.bool_], radius: float) -> F32:
    """Push solid foreground colours outwards so feathered edges carry no backdrop fringe."""
    rgba = arr.copy()
    rgba[..., 3] = solid
    img = Image.fromarray(to_u8(rgba)).convert("RGBa").filter(ImageFilter.GaussianBlur(radius))
    return np.where(solid[..., None], arr[..., :3], to_f32(img.convert("RGBA"))[..., :3])


def mask_from_border(rgb: F32) -> F32:
    """Foreground alpha keyed against the median border colour."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg = np.median(border, axis=0).astype(np.float32)
    bdist = np.linalg.norm(border - bg, axis=1)
    if float(np.mean(bdist < 0.1)) < 0.7:
        return card_mask(rgb.shape[0], rgb.shape[1])
    lo = max(0.08, 1.5 * float(np.percentile(bdist, 95)))
    dist = np.sqrt(np.sum((rgb - bg) ** 2, axis=-1)).astype(np.float32)
    reach = reachable(dist < lo + 0.06)
    return np.where(reach, smoothstep(lo, lo + 0.12, dist), np.float32(1.0)).astype(np.float32)


def reachable(bg: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Background pixels joined to an image edge by a straight background run."""
    acc = np.logical_and.accumulate
    left, top = acc(bg, axis=1), acc(bg, axis=0)
    right = acc(bg[:, ::-1], axis=1)[:, ::-1]
    bottom = acc(bg[::-1], axis=0)[::-1]
    return np.asarray(left | right | top | bottom, dtype=np.bool_)


def card_mask(h: int, w: int) -> F32:
    """Soft-edged rectangle covering all but a thin margin."""
    f = int(0.04 * min(h, w))
    mask = np.zeros((h, w), dtype=np.float32)
    mask[f : h - f, f : w - f] = 1.0
    return blur(mask, f / 2)


def name_rgb(name: str, key: str) -> tuple[int, int, int]:
    """Stable colour for one placeholder part, derived from a hash of the name."""
    d = hashlib.sha256(f"{key}:{name}".encode()).digest()
    if key in _FIXED:
        return _FIXED[key][d[0] % len(_FIXED[key])]
    sat, val = {"main": (0.35, 0.45), "legs": (0.2, 0.2), "trim": (0.5, 0.3)}.get(key, (0.1, 0.1))
    rgb = colorsys.hsv_to_rgb(d[0] / 255, sat + d[1] / 255 * 0.3, val + d[2] / 255 * 0.3)
    return (int(rgb[0] * 255), int(rgb[1] * 255), int(rgb[2] * 255))


def placeholder(role: str, name: str, work: int) -> Image.Image:
    """Draw a shaded figure or garment silhouette coloured from a hash of the name."""
    h = max(32, min(work, 1024))
    w, ss = max(16, int(h * (0.42 if role == "subject" else 0.9))), 2
    colours = {k: name_rgb(name, k) for k in ("main", "legs", "trim", "skin", "hair", "shoe")}
    canvas = Image.new("RGBA", (w * ss, h * ss), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for shape in (_FIGURE if role == "subject" else _GARMENT).split(";"):
        key, kind, *nums = shape.split()
        pct = [float(n) / 100 for n in nums]
        pts = [(pct[i] * w * ss, pct[i + 1] * h * ss) for i in range(0, len(pct), 2)]
        fill = (*colours[key], 255)
        if kind == "E":
            draw.ellipse([pts[0], pts[1]], fill=fill)
            continue
        draw.polygon(pts, fill=fill)
        if kind == "M":
            draw.polygon([(w * ss - x, y) for x, y in pts], fill=fill)
    arr = to_f32(canvas.resize((w, h), Image.Resampling.BOX))
    xs, ys = np.linspace(-1.0, 1.0, w), np.linspace(0.0, 1.0, h)
    shade = (0.78 + 0.22 * np.cos(xs * 1.3))[None, :] * (1.06 - 0.12 * ys)[:, None]
    arr[..., :3] *= shade[..., None].astype(np.float32)
    return Image.fromarray(to_u8(arr))
