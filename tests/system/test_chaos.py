"""A short chaos round in every test run; ``tests/chaos_harness.py --long`` is the long one."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from chaos_harness import ChaosConfig, run_chaos


@pytest.mark.timeout(120)
async def test_kill_9_under_load_breaks_no_promise(tmp_path: Path) -> None:
    report = await run_chaos(ChaosConfig(seed=20261128), tmp_path)
    summary = json.dumps(asdict(report), indent=1)
    assert report.ok, summary
    # The round really did what it is named for.
    assert report.kills >= 4
    assert report.kills_during_first_start == 1
    assert report.first_start_trials == 2
    assert report.acknowledged > 20
    assert report.idempotent_replays > 0
    assert report.streams_closed_mid_way > 0
    assert report.artifacts_verified >= report.acknowledged
    assert report.events_checked > 0
