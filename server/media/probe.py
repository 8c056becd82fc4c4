"""What encoded output bytes really are: images and MP4 videos probed from the bytes alone.

Compute outputs are trusted only once they decode: the mime type, the dimensions and,
for a video, the frame count and duration are read here, never taken from what the
producer claimed. Images go through ``probe_image`` (PNG, JPEG, WebP, decoded in full);
an MP4 is opened with OpenCV's FFmpeg backend and every frame is decoded (``grab``,
without colour conversion), so a truncated file, one whose container promises more frames
than it holds, or one that does not open at all is refused.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import cv2

from server.media.images import InvalidImageError, probe_image

# Outputs may be larger than inputs (upscales, generation up to 8192 a side).
MAX_OUTPUT_PIXELS = 8192 * 8192
MAX_VIDEO_FRAMES = 10_000
# ISO base media brands an MP4 from an encoder we accept may carry in its ``ftyp`` box.
_MP4_BRANDS = frozenset({b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1"})


class InvalidMediaError(ValueError):
    """The bytes are not an acceptable image or video; the message says why."""


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """What a probe learned about an encoded image or video."""

    mime_type: str
    width: int
    height: int
    duration_s: float | None = None
    frame_count: int = 0

    @property
    def is_video(self) -> bool:
        """Whether it is a video."""
        return self.mime_type.startswith("video/")


def is_mp4(data: bytes) -> bool:
    """Whether ``data`` starts like an ISO base media (MP4) file with a known brand."""
    return len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in _MP4_BRANDS


def probe_media(data: bytes, *, max_bytes: int, max_pixels: int = MAX_OUTPUT_PIXELS) -> MediaInfo:
    """Probe an encoded output: an MP4 video, or else a PNG, JPEG or WebP image.

    Raises:
        InvalidMediaError: empty, too large, not an accepted format, or corrupt.
    """
    if len(data) > max_bytes:
        raise InvalidMediaError(f"larger than {max_bytes} bytes")
    if is_mp4(data):
        return probe_video(data, max_pixels=max_pixels)
    try:
        image = probe_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    except InvalidImageError as exc:
        raise InvalidMediaError(str(exc)) from None
    return MediaInfo(image.mime_type, image.width, image.height)


def probe_video(
    data: bytes, *, max_pixels: int = MAX_OUTPUT_PIXELS, max_frames: int = MAX_VIDEO_FRAMES
) -> MediaInfo:
    """Open an MP4 and decode every frame: its size, frame count and duration (frames / fps).

    Blocking (it decodes the whole video); run it off the event loop.

    Raises:
        InvalidMediaError: not an MP4 that opens, too large, or fewer frames than it claims.
    """
    if not is_mp4(data):
        raise InvalidMediaError("not an MP4 file")
    # OpenCV reads from a path; the file lives only as long as the probe.
    handle, path = tempfile.mkstemp(prefix="sartiq-probe-", suffix=".mp4")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        return _decode(path, max_pixels=max_pixels, max_frames=max_frames)
    finally:
        os.unlink(path)


def _decode(path: str, *, max_pixels: int, max_frames: int) -> MediaInfo:
    capture = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            raise InvalidMediaError("the MP4 does not open (no readable video track)")
        width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        declared = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if width <= 0 or height <= 0 or not 0 < fps <= 1000:
            raise InvalidMediaError("the MP4 has no usable video stream")
        if width * height > max_pixels:
            raise InvalidMediaError(f"video frames have more than {max_pixels} pixels")
        if not 0 < declared <= max_frames:
            raise InvalidMediaError(f"the MP4 declares {declared} frames (1-{max_frames})")
        decoded = 0
        while decoded <= declared and capture.grab():
            decoded += 1
    finally:
        capture.release()
    if decoded != declared:
        raise InvalidMediaError(f"the MP4 holds {decoded} decodable frames of {declared} declared")
    return MediaInfo("video/mp4", width, height, duration_s=decoded / fps, frame_count=decoded)
