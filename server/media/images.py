"""Safe probing of untrusted image bytes: format, size and pixel-count limits."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
# Only these decoders ever see untrusted bytes; Pillow would otherwise try dozens.
ACCEPTED_FORMATS = tuple(_MIME)


class InvalidImageError(ValueError):
    """The bytes are not an acceptable image; the message says why."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What a probe learned about an image."""

    mime_type: str
    width: int
    height: int


def probe_image(data: bytes | Path, *, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Check that ``data`` (bytes or a file) is a PNG, JPEG or WebP within the limits.

    Only those three decoders are tried. The pixel count is checked from the header
    before any pixel is decoded, so a decompression bomb costs nothing; then the image
    is decoded in full, so a truncated or corrupt one is caught here.

    Raises:
        InvalidImageError: empty, too large, not an accepted format, or corrupt.
    """
    size = data.stat().st_size if isinstance(data, Path) else len(data)
    if not size:
        raise InvalidImageError("image is empty")
    if size > max_bytes:
        raise InvalidImageError(f"image is larger than {max_bytes} bytes")
    source: Path | io.BytesIO = data if isinstance(data, Path) else io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source, formats=ACCEPTED_FORMATS) as image:
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
    except UnidentifiedImageError as exc:
        raise InvalidImageError("image must be PNG, JPEG or WebP") from exc
    except Exception as exc:  # any decoder failure on untrusted bytes is a bad image
        raise InvalidImageError("image cannot be decoded") from exc
    return ImageInfo(mime, width, height)
