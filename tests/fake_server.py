"""The service with the fake compute backend, in its own process, for tests that crash it.

    python tests/fake_server.py hold|instant

Settings come from ``SARTIQ_*`` variables as for ``python -m server`` (workers included:
each worker runs this same command); the fake either holds every task (so generations
stay live) or completes it at once.
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
        return App(settings, compute=FakeComputeBackend(hold=hold))

    return make


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "instant"
    run(_app(mode == "hold"), [sys.executable, __file__, mode])
