"""The service with the fake compute backend, run like ``python -m server`` (workers too).

    python -m benchmarks.fleet hold|instant

Settings come from ``SARTIQ_*`` variables; with ``SARTIQ_SERVER__WORKERS=N`` this process
supervises N workers, each running this same command. The fake holds every task (the
cost of accepting work) or completes it at once (end to end).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from server.__main__ import run
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import Settings


def _app(hold: bool) -> Callable[[Settings], App]:
    def make(settings: Settings) -> App:
        return App(settings, compute=FakeComputeBackend(hold=hold, retain_finished=1000))

    return make


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "instant"
    run(_app(mode == "hold"), [sys.executable, "-m", "benchmarks.fleet", mode])
