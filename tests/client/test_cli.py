"""The README tour through the ``sartiq`` CLI, as a user runs it, against a real server."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from PIL import Image

from server.app import App

ROOT = Path(__file__).resolve().parents[2]


async def sartiq(app: App, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sartiq_grpc.cli",
        "--target",
        f"127.0.0.1:{app.port}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode().strip()


async def test_tour(app: App, tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scripts.demo_images",
        str(demo),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert await process.wait() == 0
    subject = await sartiq(app, "subject", "Ana", "--image", str(demo / "model.png"))
    product = await sartiq(app, "product", "Dress", "--image", str(demo / "dress.png"))
    generation = await sartiq(
        app,
        "generate",
        "--subject",
        subject,
        "--product",
        product,
        "--shot",
        "full-body front",
        "--batch",
        "2",
        "--width",
        "128",
        "--height",
        "192",
    )
    events = [
        json.loads(line) for line in (await sartiq(app, "watch", generation, "--json")).splitlines()
    ]
    assert [e["sequence"] for e in events] == [str(n) for n in range(1, len(events) + 1)]
    assert events[0]["kind"] == "EVENT_KIND_GENERATION_CREATED"
    assert events[-1]["terminal"]
    summary = (await sartiq(app, "watch", generation)).splitlines()
    assert f"{generation} COMPLETED" in summary
    assert sum(": artifact:" in line for line in summary) == 2
    # Downloaded over gRPC into a directory of the client's choosing: no server paths.
    downloads = tmp_path / "downloads"
    outputs = (await sartiq(app, "outputs", generation, "--dir", str(downloads))).splitlines()
    assert len(outputs) == 2
    for path in outputs:
        assert Path(path).parent == downloads
        with Image.open(path) as image:
            assert image.size == (128, 192)
    assert generation in await sartiq(app, "list")
    assert await sartiq(app, "health") == "SERVING"
