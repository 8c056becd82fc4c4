"""Tiny diffusion models on disk and a compute server serving them, for a test module."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The diffusion extra (torch, diffusers, transformers, peft) is optional: without it these
# tests cannot build a model. CI installs it (see .ci/run); a laptop without it skips.
for _module in ("torch", "diffusers", "transformers", "peft"):
    pytest.importorskip(
        _module,
        reason=f"{_module} missing: pip install torch==2.13.0 && pip install -e '.[diffusion]'",
    )

import tiny_models  # noqa: E402 - needs torch
from fleet_rig import TOKEN  # noqa: E402
from procs import ServerProcess  # noqa: E402

# diffusers and transformers warn about their own deprecations while the tiny models
# are built and saved in the test process; those are theirs, not this project's.
IGNORED_WARNINGS = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@dataclass(frozen=True)
class Models:
    """The tiny models' directories, the registry serving them, and a LoRA of the image model."""

    root: Path
    image: Path
    video: Path
    registry: Path
    lora: bytes


# Where the models run: "auto" (CUDA when present, else the CPU); `make gpu-check` sets
# "cuda", so a machine whose GPU is not usable fails instead of quietly using the CPU.
DEVICE = os.environ.get("SARTIQ_TEST_DIFFUSION_DEVICE", "auto")


def build_models(root: Path) -> Models:
    image = tiny_models.stable_diffusion(root / "tiny-sd")
    video = tiny_models.stable_video_diffusion(root / "tiny-svd")
    registry = tiny_models.registry(root / "models.toml", image, video, device=DEVICE)
    return Models(root, image, video, registry, tiny_models.lora(image))


def models_and_server(workers: str = "1") -> Iterator[tuple[Models, int]]:
    """Build the models, run a compute server on them; yields both (module fixtures)."""
    with tempfile.TemporaryDirectory(prefix="sartiq-diffusion-") as tmp:
        root = Path(tmp)
        models = build_models(root)
        server = ServerProcess.compute_server(
            root, token=TOKEN, workers=workers, models=str(models.registry)
        )
        with server.running(timeout=90) as port:
            yield models, port
