"""The diffusion provider: real pipelines behind the compute server, from a model registry.

The compute server and its workers run the CPU processors by default. With
``SARTIQ_COMPUTE_SERVER__MODELS`` naming a model registry file (``models``), the task
types it lists run on its diffusion models instead (``tasks``: what each does); the rest,
IMAGE_ADJUSTER always, stay on the CPU. This module imports nothing heavy: torch and
diffusers (the ``diffusion`` extra) load in a worker at its first diffusion task
(``runtime``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.compute.base import OutputFile
from server.compute.diffusion.models import ModelRegistry, ModelRegistryError, load_registry
from server.compute.processors.tasks import default_registry
from server.compute.registry import ProcessorContext, ProcessorRegistry
from server.domain.enums import TaskType

EXTRA = "pip install '.[diffusion]'"


@dataclass(frozen=True)
class DiffusionProcessor:
    """The processor of one task type on its model (picklable: sent to worker processes)."""

    task_type: TaskType
    registry: ModelRegistry

    def __call__(self, params: dict[str, Any], ctx: ProcessorContext) -> list[OutputFile]:
        """Run the task on the worker's runtime (loaded at its first diffusion task)."""
        from server.compute.diffusion import runtime, tasks

        found = self.registry.model_for(self.task_type)
        if found is None:  # the registry was checked when the processor was made
            raise RuntimeError(f"no model serves {self.task_type}")
        name, model = found
        rt = runtime.runtime_of(self.registry, ctx)
        with rt.lock:
            return tasks.TASKS[self.task_type](name, model, params, ctx, rt)


@dataclass(frozen=True)
class Providers:
    """The processor of every task type, and what serves each (for ``/health``)."""

    processors: ProcessorRegistry
    serving: dict[str, dict[str, str]]  # task type -> provider, and model and pipeline


def providers(
    models: Path | None, cpu: ProcessorRegistry | None = None, *, runs_here: bool = True
) -> Providers:
    """The ``cpu`` processors, with the task types ``models`` lists on their diffusion models.

    ``runs_here`` false: for an API server of the fleet, which only says what its workers
    run, so neither the weights nor the extra need to be on its machine.

    Raises:
        ModelRegistryError: the registry is not valid, a model directory is missing, or
            the ``diffusion`` extra is not installed.
    """
    cpu = cpu or default_registry()
    serving = {t.value: {"provider": "cpu"} for t in cpu.task_types}
    if models is None:
        return Providers(cpu, serving)
    registry = load_registry(models, check_paths=runs_here)
    missing = [m for m in ("torch", "diffusers", "transformers") if not _installed(m)]
    if runs_here and registry.tasks and missing:
        raise ModelRegistryError(f"the model registry {models} needs {', '.join(missing)}: {EXTRA}")
    processors = {t: cpu.get(t) for t in cpu.task_types}
    for task_type, name in registry.tasks.items():
        processors[task_type] = DiffusionProcessor(task_type, registry)
        serving[task_type.value] = {
            "provider": "diffusion",
            "model": name,
            "pipeline": registry.models[name].pipeline,
        }
    return Providers(ProcessorRegistry(processors), serving)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
