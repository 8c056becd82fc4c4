"""The model registry file: what it accepts, and the start it stops with a precise reason.

These need no torch: reading the registry imports nothing heavy, and a compute server or
worker refuses to start on a missing weights directory before it loads anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.compute.diffusion import providers
from server.compute.diffusion.models import ModelRegistryError, load_registry
from server.domain.enums import TaskType

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _registry(tmp_path: Path, tasks: str, *, video: bool = False) -> Path:
    (tmp_path / "weights").mkdir(exist_ok=True)
    pipeline = "StableVideoDiffusionPipeline" if video else "StableDiffusionXLPipeline"
    return _write(
        tmp_path / "models.toml",
        f'[models.m]\npipeline = "{pipeline}"\npath = "{tmp_path / "weights"}"\n'
        f"steps = 20\nguidance = 4.5\n[tasks]\n{tasks}\n",
    )


def test_a_registry_maps_task_types_to_named_models(tmp_path: Path) -> None:
    registry = load_registry(_registry(tmp_path, 'GENERATION = "m"\nREFINE = "m"'))
    name, model = registry.model_for(TaskType.GENERATION) or ("", None)
    assert name == "m"
    assert model is not None
    assert (model.pipeline, model.steps, model.guidance, model.dtype, model.device) == (
        "StableDiffusionXLPipeline",
        20,
        4.5,
        "auto",
        "auto",
    )
    assert registry.model_for(TaskType.IMAGE_ADJUSTER) is None  # stays on the CPU


@pytest.mark.parametrize(
    ("tasks", "video", "expected"),
    [
        ('GENERATION = "nope"', False, "names model 'nope', not defined"),
        ('VIDEO_GENERATION = "m"', False, "not one of ['StableVideoDiffusionPipeline']"),
        ('GENERATION = "m"', True, "makes videos, not images"),
        ('IMAGE_ADJUSTER = "m"', False, "runs on the CPU processor only"),
        ('GENERATON = "m"', False, "tasks.GENERATON"),
    ],
)
def test_a_registry_that_does_not_fit_is_refused_with_its_reason(
    tmp_path: Path, tasks: str, video: bool, expected: str
) -> None:
    with pytest.raises(ModelRegistryError) as refused:
        load_registry(_registry(tmp_path, tasks, video=video))
    assert expected in str(refused.value)


def test_unknown_keys_and_bad_values_are_named(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "models.toml",
        '[models.m]\npipeline = "StableDiffusionPipeline"\npath = "/x"\nsteps = 0\n'
        'dtype = "float8"\ncolour = 1\n',
    )
    with pytest.raises(ModelRegistryError) as refused:
        load_registry(path)
    message = str(refused.value)
    assert "models.m.steps" in message
    assert "models.m.dtype" in message
    assert "models.m.colour" in message


def test_a_file_that_is_not_toml_or_not_there_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelRegistryError, match="is not TOML"):
        load_registry(_write(tmp_path / "bad.toml", "[models\n"))
    with pytest.raises(ModelRegistryError, match="cannot read"):
        load_registry(tmp_path / "absent.toml")


def test_a_missing_weights_directory_is_named(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "models.toml",
        f'[models.sdxl]\npipeline = "StableDiffusionXLPipeline"\npath = "{tmp_path / "gone"}"\n'
        '[tasks]\nGENERATION = "sdxl"\n',
    )
    with pytest.raises(ModelRegistryError) as refused:
        load_registry(path)
    assert f"model 'sdxl': its weights directory {tmp_path / 'gone'} does not exist" in str(
        refused.value
    )
    # An API server of the fleet only says what its workers run: no weights needed there.
    served = providers(path, runs_here=False).serving
    assert served["GENERATION"] == {
        "provider": "diffusion",
        "model": "sdxl",
        "pipeline": "StableDiffusionXLPipeline",
    }
    assert served["IMAGE_ADJUSTER"] == {"provider": "cpu"}


def test_without_a_registry_every_task_type_runs_on_the_cpu() -> None:
    served = providers(None).serving
    assert served == {t.value: {"provider": "cpu"} for t in TaskType}


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "server.compute.server"],
        [sys.executable, "-m", "server.compute.fleet.worker"],
    ],
)
def test_a_compute_process_will_not_start_on_missing_weights_and_says_which(
    tmp_path: Path, argv: list[str]
) -> None:
    missing = tmp_path / "no-such-weights"
    path = _write(
        tmp_path / "models.toml",
        f'[models.sd]\npipeline = "StableDiffusionPipeline"\npath = "{missing}"\n'
        '[tasks]\nEDITING = "sd"\n',
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARTIQ_")}
    env.update(
        SARTIQ_COMPUTE_SERVER__MODELS=str(path),
        SARTIQ_COMPUTE_SERVER__PORT="0",
        # The worker checks its registry before it reaches the broker: none is needed.
        SARTIQ_COMPUTE_SERVER__BROKER_URL="redis://127.0.0.1:1/0",
        SARTIQ_COMPUTE_SERVER__STORAGE__URL=f"file://{tmp_path / 'store'}",
    )
    if "server.compute.server" in argv:
        del env["SARTIQ_COMPUTE_SERVER__BROKER_URL"]
        del env["SARTIQ_COMPUTE_SERVER__STORAGE__URL"]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=50, check=False)
    assert done.returncode != 0
    assert f"its weights directory {missing} does not exist" in done.stderr.decode()
