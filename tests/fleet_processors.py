"""The workers' processors in fleet tests: the real CPU processors, witnessed and holdable.

A task whose parameters carry ``test_tag`` is noted in ``runs.log`` of the directory
``SARTIQ_TEST_FLEET_DIR`` (one line per run: the tag and the worker's pid, appended
atomically) before its real processor runs, so a test sees every run, re-runs included,
independently of the records. A tag starting with ``hold`` keeps the task running (its
progress reported, so it can be cancelled) until a file of that name appears in the
directory: the test decides when it ends. ``test_tag`` is removed before the real
processor sees the parameters.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from server.compute.base import OutputFile
from server.compute.processors.tasks import default_registry
from server.compute.registry import Processor, ProcessorContext, ProcessorRegistry
from server.domain.enums import TaskType


def registry() -> ProcessorRegistry:
    """Every processor of the default registry, wrapped."""
    base = default_registry()
    directory = Path(os.environ["SARTIQ_TEST_FLEET_DIR"])
    return ProcessorRegistry({t: _witnessed(base.get(t), directory) for t in TaskType})


def _witnessed(processor: Processor, directory: Path) -> Processor:
    def run(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
        tag = params.get("test_tag")
        if not isinstance(tag, str):
            return processor(params, ctx)
        line = f"{tag} {os.getpid()}\n".encode()
        fd = os.open(directory / "runs.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        if tag.startswith("hold"):
            step = 0
            while not (directory / tag).exists():
                step += 1
                ctx.progress(min(0.01 * step, 0.5))
                time.sleep(0.02)  # the task's own work: it runs until the test releases it
        return processor({k: v for k, v in params.items() if k != "test_tag"}, ctx)

    return run
