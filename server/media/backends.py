"""The artifact storage the settings name: ``SARTIQ_STORAGE__URL`` (or the artifact directory)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from server.config import MediaSettings, StorageSettings
from server.domain.errors import StartupError
from server.media.artifacts import FileArtifactStore
from server.media.storage import ArtifactStorage

# S3's bucket naming rules (R2, GCS and MinIO accept the same names).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def open_storage(storage: StorageSettings, media: MediaSettings) -> ArtifactStorage:
    """The storage ``storage.url`` names; without one, the directory ``media.artifact_dir``.

    Raises:
        StartupError: the URL is not a usable ``file://`` or ``s3://`` URL, or the s3
            client library is not installed.
    """
    if not storage.url:
        return FileArtifactStore(media.artifact_dir)
    parts = urlsplit(storage.url)
    if parts.query or parts.fragment or parts.username or parts.password or parts.port:
        raise _bad_url(storage.url, "must not carry credentials, a port, a query or a fragment")
    if parts.scheme == "file":
        return FileArtifactStore(_directory(storage.url, parts.netloc, parts.path))
    bucket, prefix = _bucket_and_prefix(storage.url, parts.netloc, parts.path)
    try:
        from server.media.s3 import S3ArtifactStorage  # an optional extra: imported on use
    except ImportError:
        raise StartupError(
            "s3:// artifact storage needs the s3 extra: pip install 'sartiq-generation[s3]'"
        ) from None
    return S3ArtifactStorage(
        bucket,
        prefix,
        endpoint_url=storage.s3_endpoint_url,
        addressing_style=storage.s3_addressing_style,
        part_bytes=storage.s3_part_bytes,
        spool_dir=storage.spool_dir or Path(tempfile.gettempdir()) / "sartiq-uploads",
    )


def _directory(url: str, host: str, path: str) -> Path:
    if host not in ("", "localhost"):
        raise _bad_url(url, "a file:// URL names a directory of this machine (no host)")
    directory = Path(unquote(path))
    if not directory.is_absolute() or path in ("", "/"):
        raise _bad_url(url, "must name an absolute directory, e.g. file:///var/lib/sartiq")
    return directory


def _bucket_and_prefix(url: str, bucket: str, path: str) -> tuple[str, str]:
    if _BUCKET.fullmatch(bucket) is None:
        raise _bad_url(url, "the bucket must be 3-63 lowercase letters, digits, dots, hyphens")
    prefix = path.strip("/")
    segments = prefix.split("/") if prefix else []
    if any(segment in ("", ".", "..") for segment in segments):
        raise _bad_url(url, "the prefix must not hold empty, '.' or '..' segments")
    return bucket, prefix


def _bad_url(url: str, why: str) -> StartupError:
    shown = urlsplit(url)._replace(netloc=urlsplit(url).hostname or "").geturl()[:200]
    return StartupError(f"SARTIQ_STORAGE__URL {shown!r} {why}")
