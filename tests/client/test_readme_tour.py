"""The README's tour, run as written: its shell blocks, in bash, against a real server.

The server runs here on port 0 with the real local CPU backend; the commands reach it
through ``SARTIQ_TARGET``. They run from the repository root, as the README says, and
write only below ``var/`` (ignored by git).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

from conftest import make_settings
from PIL import Image

from server.app import App

ROOT = Path(__file__).resolve().parents[2]


def _tour_blocks() -> str:
    """The ```sh blocks of the README's "A tour" section, joined."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A tour", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 3, "the tour: GENERATE, the other strategies, AGENTIC"
    return "\n".join(blocks)


async def test_the_readme_tour_works_as_written(tmp_path: Path) -> None:
    script = "set -euo pipefail\n" + _tour_blocks() + '\necho "CLIP=$CLIP"\n'
    out = ROOT / "var" / "out"
    for old in out.glob("*"):
        old.unlink()
    async with App(make_settings(tmp_path)) as app:  # local CPU compute, as `make run`
        env = {**os.environ, "SARTIQ_TARGET": f"127.0.0.1:{app.port}"}
        env.pop("SARTIQ_API_KEY", None)
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            script,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 300)
        assert process.returncode == 0, stderr.decode()[-3000:]
    lines = stdout.decode().splitlines()
    clip = next(line for line in lines if line.startswith("CLIP=")).removeprefix("CLIP=")
    generation = json.loads((ROOT / "var" / "generation.json").read_text())
    assert generation["status"] == "GENERATION_STATUS_COMPLETED"
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as image:
        assert image.size == (512, 768)
    [video] = list(out.glob("*.mp4"))
    assert video.stat().st_size > 0
    # Every watched generation ended COMPLETED (watch prints "<id> <STATUS>" last).
    statuses = [line.split()[1] for line in lines if re.fullmatch(r"[0-9a-f-]{36} [A-Z_]+", line)]
    assert len(statuses) == 9
    assert set(statuses) == {"COMPLETED"}
    assert f"{clip} COMPLETED" in lines
    # The AGENTIC example shows its attempts: scores, why each retry changed, the accepted one.
    assert any(line.startswith("    attempt 1: score") for line in lines)
    assert any(line.startswith("      why: attempt 1 scored") for line in lines)
    assert any(line.startswith("    accepted attempt ") for line in lines)
