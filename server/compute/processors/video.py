"""VIDEO_GENERATION on the CPU: a camera move (zoom and pan) over a still, as H.264 MP4.

The camera zooms in or out and pans along a direction drawn from the seed; how far grows
with ``motion_bucket_id`` (1 almost still, 255 the most). The move eases in and out. Frames
are rendered with OpenCV (bicubic, the view always inside the picture) and encoded by
imageio-ffmpeg's bundled ffmpeg with a fixed configuration (libx264, yuv420p, CRF 18,
preset "fast", 2 encoder threads, bit-exact container flags), so the same inputs give the
same bytes on any machine running the same ffmpeg build.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
from PIL import Image

from server.compute.processors.imaging import U8
from server.compute.registry import ProcessorError

ProgressFn = Callable[[float], None]

MAX_VIDEO_SIDE = 2048  # longer inputs are scaled down first (encoding cost, player support)
_ENCODER_TIMEOUT_S = 600.0
_OUTPUT_PARAMS = [
    "-preset",
    "fast",
    "-crf",
    "18",
    "-threads",
    "2",  # fixed: x264's output depends on its thread count
    "-movflags",
    "+faststart",
    "-fflags",
    "+bitexact",
    "-flags:v",
    "+bitexact",
    "-vf",
    "scale=out_color_matrix=bt709:out_range=tv:flags=bicubic+accurate_rnd+full_chroma_int",
    "-colorspace",
    "bt709",
    "-color_primaries",
    "bt709",
    "-color_trc",
    "bt709",
    "-color_range",
    "tv",
]


@dataclass(frozen=True, slots=True)
class VideoInput:
    """One VIDEO_GENERATION task."""

    motion_bucket_id: int
    fps: int
    duration_s: float
    seed: int


@dataclass(frozen=True, slots=True)
class RenderedVideo:
    """An encoded MP4 and its geometry."""

    data: bytes
    width: int
    height: int
    frame_count: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class _Move:
    """Zoom at the start and end, and the pan (in fractions of the frame) over the move."""

    zoom_from: float
    zoom_to: float
    pan_x: float
    pan_y: float


def frame_count(fps: int, duration_s: float) -> int:
    """round(fps x duration), at least one frame."""
    return max(1, round(fps * duration_s))


def camera_move(motion_bucket_id: int, seed: int) -> _Move:
    """The seed's direction (zoom in or out, pan angle) at the motion bucket's intensity."""
    rng = np.random.default_rng([seed % 2**63, 0x51DE])
    m = (min(max(motion_bucket_id, 1), 255) - 1) / 254.0
    zoom = 0.015 + 0.25 * m  # relative zoom change over the move
    pan = 0.01 + 0.09 * m  # pan travel, fraction of the frame
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    zoom_in = bool(rng.integers(0, 2))
    base = 1.0 + 2.0 * pan  # enough margin that the pan never leaves the picture
    z0, z1 = (base, base + zoom) if zoom_in else (base + zoom, base)
    return _Move(z0, z1, pan * math.cos(angle), pan * math.sin(angle))


def render_video(img: Image.Image, spec: VideoInput, progress: ProgressFn) -> RenderedVideo:
    """Render the camera move over ``img`` into an H.264 MP4 of round(fps x duration) frames.

    Args:
        img: The still (RGB; transparency is flattened onto white).
        spec: Motion amount, frame rate, length and seed.
        progress: Called as frames are rendered, with increasing values below 1.

    Returns:
        The MP4 bytes, its (even) size, frame count and duration (frames / fps).

    Raises:
        ProcessorError: With category "validation" for out-of-range settings, "internal"
            when the encoder fails.
    """
    _validate(spec)
    still = _prepare(img)
    h, w = still.shape[:2]
    frames = frame_count(spec.fps, spec.duration_s)
    move = camera_move(spec.motion_bucket_id, spec.seed)
    every = max(1, frames // 50)

    def rendered() -> Iterator[U8]:
        for i in range(frames):
            yield _frame(still, move, i / (frames - 1) if frames > 1 else 0.0)
            if (i + 1) % every == 0:
                progress(0.05 + 0.85 * (i + 1) / frames)

    data = encode_mp4(rendered(), w, h, spec.fps)
    progress(0.97)
    return RenderedVideo(data, w, h, frames, frames / spec.fps)


def encode_mp4(frames: Iterable[U8], width: int, height: int, fps: int) -> bytes:
    """RGB frames of ``width`` x ``height`` as an H.264 MP4 (the module's fixed settings).

    The same frames give the same bytes.

    Raises:
        ProcessorError: "internal" when the encoder fails or writes nothing.
    """
    with tempfile.TemporaryDirectory(prefix="sartiq-video-") as tmp:
        path = Path(tmp) / "out.mp4"
        writer = imageio_ffmpeg.write_frames(
            str(path),
            (width, height),
            pix_fmt_in="rgb24",
            pix_fmt_out="yuv420p",
            fps=fps,
            quality=None,
            codec="libx264",
            macro_block_size=1,
            ffmpeg_log_level="error",
            ffmpeg_timeout=_ENCODER_TIMEOUT_S,
            output_params=list(_OUTPUT_PARAMS),
        )
        try:
            writer.send(None)
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
        except OSError as exc:
            raise ProcessorError("internal", f"video encoder failed: {exc}") from exc
        finally:
            writer.close()
        data = path.read_bytes() if path.exists() else b""
    if len(data) < 32:
        raise ProcessorError("internal", "video encoder produced no output")
    return data


def _validate(spec: VideoInput) -> None:
    if not 1 <= spec.motion_bucket_id <= 255:
        raise ProcessorError("validation", "motion_bucket_id must be 1-255")
    if not 1 <= spec.fps <= 60:
        raise ProcessorError("validation", "fps must be 1-60")
    if not (math.isfinite(spec.duration_s) and 0.5 <= spec.duration_s <= 30.0):
        raise ProcessorError("validation", "duration_s must be 0.5-30")


def _prepare(img: Image.Image) -> U8:
    """Opaque RGB, at most ``MAX_VIDEO_SIDE`` on its longer side, even width and height."""
    if img.mode == "RGBA":
        flat = Image.new("RGB", img.size, (255, 255, 255))
        flat.paste(img, mask=img.getchannel("A"))
        img = flat
    img = img.convert("RGB")
    if max(img.size) > MAX_VIDEO_SIDE:
        img = img.copy()
        img.thumbnail((MAX_VIDEO_SIDE, MAX_VIDEO_SIDE), Image.Resampling.LANCZOS)
    w, h = img.width - img.width % 2, img.height - img.height % 2
    if w < 2 or h < 2:
        raise ProcessorError("validation", f"image {img.width}x{img.height} is too small")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8)[:h, :w])


def _frame(still: U8, move: _Move, t: float) -> U8:
    """The view at time t in [0, 1]: eased zoom and pan, sampled bicubically."""
    h, w = still.shape[:2]
    e = t * t * (3.0 - 2.0 * t)
    zoom = move.zoom_from + (move.zoom_to - move.zoom_from) * e
    cx = w / 2 + (e - 0.5) * move.pan_x * w
    cy = h / 2 + (e - 0.5) * move.pan_y * h
    half_w, half_h = w / (2 * zoom), h / (2 * zoom)
    cx = min(max(cx, half_w), w - half_w)
    cy = min(max(cy, half_h), h - half_h)
    # Inverse map: output pixel centre (x + 0.5) samples the source at (x0 + (x + 0.5) / zoom).
    inv = 1.0 / zoom
    matrix = np.array(
        [
            [inv, 0.0, cx - half_w + 0.5 * inv - 0.5],
            [0.0, inv, cy - half_h + 0.5 * inv - 0.5],
        ],
        dtype=np.float64,
    )
    out = cv2.warpAffine(
        still,
        matrix,
        (w, h),
        flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )
    return np.ascontiguousarray(np.asarray(out, dtype=np.uint8))
