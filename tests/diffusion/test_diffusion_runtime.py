"""The worker's runtime, in this process: models kept between tasks, evicted by the budget."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from diffusion_rig import IGNORED_WARNINGS, Models, build_models
from helpers import png_bytes

from server.compute.diffusion import providers
from server.compute.diffusion.runtime import Runtime
from server.compute.registry import ProcessorContext
from server.domain.enums import TaskType

pytestmark = [*IGNORED_WARNINGS, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def models() -> Iterator[Models]:
    with tempfile.TemporaryDirectory(prefix="sartiq-diffusion-") as tmp:
        yield build_models(Path(tmp))


def _context(keep: dict[str, Any]) -> ProcessorContext:
    image = png_bytes((40, 80, 160), (32, 32))
    return ProcessorContext(
        resolve=lambda _: image, progress=lambda _: None, max_input_pixels=10**7, keep=keep
    )


def _runtime(keep: dict[str, Any]) -> Runtime:
    (runtime,) = keep.values()
    assert isinstance(runtime, Runtime)
    return runtime


def _run_both(registry: Path, keep: dict[str, Any]) -> list[dict[str, int]]:
    """An image task, a video task, an image task again: what is loaded after each."""
    processors = providers(registry).processors
    image = {"prompt": "x", "width": 16, "height": 16, "steps": 2, "seed": 1}
    video = {"base_image": "artifact:x", "seed": 1, "fps": 2, "duration_s": 1.0}
    seen = []
    for task_type, params in (
        (TaskType.GENERATION, image),
        (TaskType.VIDEO_GENERATION, video),
        (TaskType.GENERATION, image),
    ):
        processors.get(task_type)(params, _context(keep))
        seen.append(dict(_runtime(keep).loaded))
    return seen


def test_models_stay_loaded_between_tasks_without_a_budget(models: Models) -> None:
    keep: dict[str, Any] = {}
    first, second, third = _run_both(models.registry, keep)
    assert list(first) == ["tiny-sd"]
    assert list(second) == ["tiny-sd", "tiny-svd"]
    assert list(third) == ["tiny-svd", "tiny-sd"]  # the image model used last


def test_past_the_budget_the_least_recently_used_model_is_evicted(
    models: Models, tmp_path: Path
) -> None:
    keep: dict[str, Any] = {}
    sizes = _run_both(models.registry, keep)[1]
    # Room for the larger model alone: each load evicts the other.
    budget_gb = (max(sizes.values()) + min(sizes.values()) // 2) / 1024**3
    registry = tmp_path / "models.toml"
    registry.write_text(f"memory_budget_gb = {budget_gb!r}\n" + models.registry.read_text())
    keep = {}
    first, second, third = _run_both(registry, keep)
    assert list(first) == ["tiny-sd"]
    assert list(second) == ["tiny-svd"]
    assert list(third) == ["tiny-sd"]
