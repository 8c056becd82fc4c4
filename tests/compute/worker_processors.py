"""Processors for the local backend's worker-process tests.

A worker process imports them by name (they travel pickled by reference), so they live
in a module of their own. They coordinate with a test through files: each writes its
process id to ``params["pid_file"]``, and the stepping ones run until
``params["release"]`` exists.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

from server.compute.base import OutputFile
from server.compute.registry import ProcessorContext, ProcessorError


def png(colour: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    """A small PNG."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _started(params: dict[str, Any]) -> None:
    """Say which process runs the task (written whole: a reader never sees half an id)."""
    target = Path(params["pid_file"])
    partial = target.with_suffix(".partial")
    partial.write_text(str(os.getpid()))
    partial.rename(target)


def stepped(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """Report 0.5 between short steps until released (each report may stop it: cancel)."""
    _started(params)
    release = Path(params["release"])
    while not release.exists():
        ctx.progress(0.5)
        time.sleep(0.005)  # one step of work
    return [OutputFile(png(), "image/png", 4, 4, seed=0)]


def stubborn(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """Never reports progress (so never sees a cancel) until released."""
    _started(params)
    release = Path(params["release"])
    while not release.exists():
        time.sleep(0.005)
    return [OutputFile(png(), "image/png", 4, 4, seed=0)]


def quick(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """Done at once."""
    _started(params)
    return [OutputFile(png(), "image/png", 4, 4, seed=0)]


def echo_input(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """The input ``params["image"]`` names, as the output (what ``ctx.resolve`` gave)."""
    try:
        data = ctx.resolve(params["image"])
    except FileNotFoundError as exc:
        raise ProcessorError("validation", f"image missing: {exc}") from exc
    return [OutputFile(data, "image/png", 4, 4, seed=0)]


def mislabelled(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """A 64x48 PNG said to be a 1x1 JPEG."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(buffer, format="PNG")
    return [OutputFile(buffer.getvalue(), "image/jpeg", 1, 1, seed=7, notes=("n",))]


def undecodable(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """Bytes said to be a PNG that are not one."""
    return [OutputFile(png()[:40], "image/png", 4, 4, seed=0)]


def modules(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """Notes which of ``params["modules"]`` this process has imported."""
    loaded = tuple(name for name in params["modules"] if name in sys.modules)
    return [OutputFile(png(), "image/png", 4, 4, seed=0, notes=loaded)]


def refusing(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """Refuses its parameters."""
    raise ProcessorError("validation", "width must be positive")


def crashing(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """Fails unexpectedly."""
    raise RuntimeError("a bug in the processor")
