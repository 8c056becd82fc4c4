"""Outputs as their bytes say they are: probed before any backend hands them on."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from server.compute.base import OutputFile
from server.compute.registry import ProcessorError
from server.domain.enums import TaskType
from server.media.probe import InvalidMediaError, MediaInfo, probe_media

# Outputs bigger than this are refused by every backend.
MAX_OUTPUT_BYTES = 512 * 1024 * 1024


def probed(
    data: bytes,
    *,
    seed: int,
    notes: Iterable[str] = (),
    recipe: Mapping[str, Any] | None = None,
    max_bytes: int = MAX_OUTPUT_BYTES,
) -> OutputFile:
    """An ``OutputFile`` whose mime type and media facts come from decoding ``data``.

    Blocking (it decodes the image or every frame of the video): run it off the loop.

    Raises:
        InvalidMediaError: ``data`` is not an image or MP4 that decodes within the limits.
    """
    info: MediaInfo = probe_media(data, max_bytes=max_bytes)
    return OutputFile(
        data=data,
        mime_type=info.mime_type,
        width=info.width,
        height=info.height,
        seed=seed,
        duration_s=info.duration_s,
        frame_count=info.frame_count,
        notes=tuple(notes),
        recipe=dict(recipe or {}),
    )


def expected_kind(task_type: TaskType) -> str:
    """What a task of ``task_type`` must produce: "video" or "image"."""
    return "video" if task_type is TaskType.VIDEO_GENERATION else "image"


def kind_of(output: OutputFile) -> str:
    """The output's kind, "video" or "image", by its (probed) mime type."""
    return "video" if output.mime_type.startswith("video/") else "image"


def verified(outputs: list[OutputFile]) -> list[OutputFile]:
    """A processor's outputs, each probed (blocking: in the worker, off any loop).

    Raises:
        ProcessorError: no output, or one that is not a decodable image or video
            (category internal).
    """
    if not outputs:
        raise ProcessorError("internal", "the processor returned no output")
    try:
        return [probed(o.data, seed=o.seed, notes=o.notes, recipe=o.recipe) for o in outputs]
    except InvalidMediaError as exc:
        raise ProcessorError(
            "internal", f"the processor returned an output that does not decode: {exc}"
        ) from None
