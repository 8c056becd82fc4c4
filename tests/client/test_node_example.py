"""The Node.js example client (examples/node/tour.js) against a real server and real compute.

It is built only from the .proto files, so this checks the contract as another language
sees it: field names, oneofs, the error trailer, stream cancel and resume.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from conftest import make_settings
from PIL import Image, ImageDraw

from server.app import App

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not on PATH"),
    pytest.mark.skipif(
        not (EXAMPLE / "node_modules").is_dir(),
        reason="examples/node/node_modules is missing: run `npm ci --prefix examples/node`",
    ),
    # Above the 120 s given to the tour itself, so its own timeout reports first.
    pytest.mark.timeout(180),
]


def demo_png(path: Path) -> Path:
    image = Image.new("RGB", (96, 128), (236, 232, 224))
    ImageDraw.Draw(image).rectangle((22, 18, 74, 112), fill=(190, 30, 45))
    image.save(path, format="PNG")
    return path


async def test_node_tour(tmp_path: Path) -> None:
    assert NODE is not None
    image = demo_png(tmp_path / "dress.png")
    out = tmp_path / "out"
    # The real local compute backend: no fake, so the tour downloads a real render.
    async with App(make_settings(tmp_path)) as app:
        process = await asyncio.create_subprocess_exec(
            NODE,
            str(EXAMPLE / "tour.js"),
            "--target",
            f"127.0.0.1:{app.port}",
            "--image",
            str(image),
            "--out",
            str(out),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
    output = stdout.decode()
    assert process.returncode == 0, f"{output}\n{stderr.decode()}"
    assert output.strip().endswith("OK")
    downloads = list(out.glob("*.png"))
    assert len(downloads) == 1
    assert str(downloads[0]) in output
    with Image.open(downloads[0]) as result:
        assert result.format == "PNG"
        assert result.size == (256, 256)
