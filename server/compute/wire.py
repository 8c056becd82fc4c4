"""The compute wire protocol (DESIGN §6), shared by the HTTP adapter and the compute server.

* ``POST /api/v1/tasks/``: ``{task_type, parameters, idempotency_key,
  origin_organization}`` (the key also as the ``Idempotency-Key`` header) -> the task
  (``status: "pending"``); the same key always answers the same task.
* ``GET /api/v1/tasks/{id}``: ``{id, task_type, status, progress, created_at,
  started_at, completed_at, output: {images: [...], videos: [...]}, error_message,
  error_category}``; 404 for an unknown id. Each output names its ``url``.
* ``GET /api/v1/tasks/{id}/outputs/{n}``: the bytes of output n.
* ``POST /api/v1/tasks/{id}/cancel``: idempotent; answers the task.
* ``POST /api/v1/evaluation/``: ``{image, base, strategy, expected_size, edited_region,
  expects_face, expectations}`` -> ``{score, criteria, feedback, measures}``.
* ``GET /health``: ``{status, capacity: {workers, running, waiting}}``.

Input images travel inside the parameters as ``data:`` URIs (base64); every error body is
``{error_category, error_message}``. Calls need ``authorization: Bearer <token>`` when the
server has one, ``/health`` excepted.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from server.domain.enums import TaskStatus

TASKS_PATH = "/api/v1/tasks/"
EVALUATION_PATH = "/api/v1/evaluation/"
HEALTH_PATH = "/health"
STATUSES = {status.value.lower(): status for status in TaskStatus}
_DATA_URI = re.compile(r"data:([\w.+/-]+);base64,", re.ASCII)
_MAGIC = (
    (b"\x89PNG", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"RIFF", "image/webp"),
)


def sniff(data: bytes) -> str:
    """The mime type of encoded media by its first bytes (octet-stream when unknown)."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[4:8] == b"ftyp":
        return "video/mp4"
    return "application/octet-stream"


def data_uri(data: bytes) -> str:
    """``data:<mime>;base64,...`` of ``data``."""
    return f"data:{sniff(data)};base64,{base64.b64encode(data).decode('ascii')}"


def is_data_uri(value: str) -> bool:
    """Whether ``value`` is a base64 ``data:`` URI."""
    return _DATA_URI.match(value) is not None


def decode_data_uri(value: str, max_bytes: int) -> bytes:
    """The bytes of a base64 ``data:`` URI.

    Raises:
        ValueError: not a base64 data URI, bad base64, or more than ``max_bytes``.
    """
    match = _DATA_URI.match(value)
    if match is None:
        raise ValueError("not a base64 data: URI")
    payload = value[match.end() :]
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise ValueError(f"data: URI holds more than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64 in data: URI: {exc}") from None


def map_strings(value: Any, change: Callable[[str], str]) -> Any:
    """A copy of a JSON value with every string passed through ``change``."""
    if isinstance(value, dict):
        return {k: map_strings(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [map_strings(v, change) for v in value]
    if isinstance(value, str):
        return change(value)
    return value
