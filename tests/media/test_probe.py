"""Probing output bytes: images and MP4 videos are what they decode to."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
from PIL import Image

from server.compute.processors.video import VideoInput, render_video
from server.media.probe import InvalidMediaError, probe_media, probe_video


def _image(fmt: str, size: tuple[int, int] = (40, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 60, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mp4() -> bytes:
    """A real 2 s, 12 fps H.264 MP4 of 64x48 from the VIDEO processor."""
    still = Image.effect_mandelbrot((64, 48), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    return render_video(still, VideoInput(127, 12, 2.0, 3), lambda _: None).data


@pytest.mark.parametrize(
    ("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")]
)
def test_an_image_is_probed_from_its_bytes(fmt: str, mime: str) -> None:
    info = probe_media(_image(fmt), max_bytes=10**6)
    assert (info.mime_type, info.width, info.height) == (mime, 40, 24)
    assert info.frame_count == 0
    assert info.duration_s is None
    assert not info.is_video


def test_a_video_is_probed_from_its_bytes(mp4: bytes) -> None:
    info = probe_media(mp4, max_bytes=10**7)
    assert (info.mime_type, info.width, info.height) == ("video/mp4", 64, 48)
    assert info.frame_count == 24
    assert info.duration_s == pytest.approx(2.0)
    assert info.is_video


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (lambda d: d[: len(d) // 2], "decodable frames of"),
        (lambda d: d[:200], "does not open"),
        (lambda d: d[:32] + bytes(len(d) - 32), "does not open"),
    ],
    ids=["half", "head-only", "zeroed"],
)
def test_a_broken_video_is_refused(mp4: bytes, cut: Callable[[bytes], bytes], why: str) -> None:
    with pytest.raises(InvalidMediaError, match=why):
        probe_media(cut(mp4), max_bytes=10**7)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"<html>502</html>", "must be PNG, JPEG or WebP"),
        (b"GIF89a" + bytes(40), "must be PNG, JPEG or WebP"),
        (_image("PNG")[:60], "cannot be decoded"),
    ],
    ids=["empty", "html", "gif", "truncated-png"],
)
def test_what_is_not_an_accepted_image_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(InvalidMediaError, match=why):
        probe_media(data, max_bytes=10**6)


def test_limits_hold(mp4: bytes) -> None:
    with pytest.raises(InvalidMediaError, match="larger than"):
        probe_media(_image("PNG"), max_bytes=10)
    with pytest.raises(InvalidMediaError, match="more than 100 pixels"):
        probe_media(_image("PNG"), max_bytes=10**6, max_pixels=100)
    with pytest.raises(InvalidMediaError, match="more than 100 pixels"):
        probe_video(mp4, max_pixels=100)
    with pytest.raises(InvalidMediaError, match="declares 24 frames"):
        probe_video(mp4, max_frames=10)
    with pytest.raises(InvalidMediaError, match="not an MP4"):
        probe_video(_image("PNG"))
