"""A processor whose module takes a second to import in a worker process.

A worker imports it while it unpickles the task, so only after the task was sent to it:
it then writes the file ``SARTIQ_TEST_IMPORT_MARKER`` names (when set) and takes a
second more. A cancel sent once that file exists reaches the worker before the
processor can start.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

from worker_processors import stepped as _stepped

from server.compute.base import OutputFile
from server.compute.registry import ProcessorContext

_MARKER = os.environ.get("SARTIQ_TEST_IMPORT_MARKER")
if multiprocessing.parent_process() is not None and _MARKER:
    Path(_MARKER).touch()
    time.sleep(1.0)  # the slow import itself


def stepped(params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
    """``worker_processors.stepped``, from this slow module."""
    return _stepped(params, ctx)
