"""Safe probing of untrusted image bytes: format, size and pixel-count limits."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


class InvalidImageError(ValueError):
    """The bytes are not an acceptable image; the message says why."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What a probe learned about an image."""

    mime_type: str
    width: int
    height: int


def probe_image(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Check that ``data`` is a PNG, JPEG or WebP within the limits, and decode it fully.

    The pixel count is checked from the header before any pixel is decoded, so a
    decompression bomb costs nothing.

    Raises:
        InvalidImageError: empty, too large, not an accepted format, or corrupt.
    """
    if not data:
        raise InvalidImageError("image is empty")
    if len(data) > max_bytes:
        raise InvalidImageError(f"image is larger than {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                mime = _MIME.get(image.format or "")
                if mime is None:
                    raise InvalidImageError("image must be PNG, JPEG or WebP")
                width, height = image.size
                if width * height > max_pixels:
                    raise InvalidImageError(f"image has more than {max_pixels} pixels")
                image.load()
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidImageError(f"image has more than {max_pixels} pixels") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError("image cannot be decoded") from exc
    return ImageInfo(mime, width, height)
