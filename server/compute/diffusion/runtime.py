"""Diffusion pipelines inside a compute worker: loaded once, kept, run seeded and cancellable.

Imported only in a worker that runs a diffusion task (it imports torch and diffusers, the
``diffusion`` extra). Hugging Face's offline mode is forced before they load and every
load is ``local_files_only``: nothing is downloaded, ever.

- **Devices**: ``auto`` is CUDA when present (float16 there, float32 on the CPU). On a
  CUDA device one task runs at a time whatever the number of worker processes (a lock
  file per device); inference runs under ``torch.inference_mode``.
- **Kept, within a budget**: a model's pipeline is loaded at its first task and kept for
  the next ones, with its image-to-image and inpainting variants sharing its weights
  (``from_pipe``). Past the registry's ``memory_budget_gb`` the least recently used
  models are evicted first.
- **LoRAs** are loaded once per model (an adapter named after the weights' digest) and
  weighted per task; a task without LoRAs runs with them disabled.
- **Progress and cancellation**: the pipeline's step callback reports progress, and a
  cancel raises from that report, so a cancel stops the task between two steps.
- **Reproducible**: a CPU ``torch.Generator`` seeded with the task's seed, so one seed
  gives the same bytes on the same machine and software.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import io
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub reads it: never download
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import diffusers
import safetensors.torch
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    DiffusionPipeline,
)

from server.compute.diffusion.models import Model, ModelRegistry
from server.compute.registry import ProcessorContext, ProcessorError

Kind = str  # "base" (text-to-image or image-to-video), "img2img", "inpaint"


def _bytes_of(pipe: DiffusionPipeline) -> int:
    """What a pipeline's weights take in memory."""
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in component.parameters())
    return total


def device_of(model: Model) -> torch.device:
    """Where ``model`` runs: ``auto`` is the first CUDA device when there is one."""
    if model.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model.device.startswith("cuda") and not torch.cuda.is_available():
        raise ProcessorError("internal", f"the model asks for {model.device}, and none is here")
    return torch.device(model.device)


def dtype_of(model: Model, device: torch.device) -> torch.dtype:
    """The weights' type: ``auto`` is float16 on CUDA, float32 on the CPU."""
    if model.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    found: torch.dtype = getattr(torch, model.dtype)
    return found


@dataclass
class _Loaded:
    """One model's pipelines in memory."""

    variants: dict[Kind, DiffusionPipeline]
    size: int
    adapters: set[str] = field(default_factory=set)

    @property
    def base(self) -> DiffusionPipeline:
        return self.variants["base"]


@dataclass(frozen=True, slots=True)
class Lora:
    """A LoRA a task asks for: its weights (safetensors bytes) and how much of it."""

    data: bytes
    weight: float

    @property
    def adapter(self) -> str:
        """The adapter's name: from the weights' digest, so one set of weights loads once."""
        return "lora_" + hashlib.sha256(self.data).hexdigest()[:24]


class Runtime:
    """The pipelines of one worker, loaded on demand and kept within the memory budget."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()
        # The threads of a thread pool share a runtime: one task at a time uses it.
        self.lock = threading.Lock()

    @property
    def loaded(self) -> dict[str, int]:
        """The models in memory and the bytes of their weights, least recently used first."""
        return {name: loaded.size for name, loaded in self._loaded.items()}

    def pipeline(self, name: str, model: Model, kind: Kind) -> DiffusionPipeline:
        """``model``'s pipeline of ``kind``, loaded (and older models evicted) if need be."""
        loaded = self._loaded.get(name)
        if loaded is None:
            loaded = self._load(name, model)
        self._loaded.move_to_end(name)
        pipe = loaded.variants.get(kind)
        if pipe is None:
            auto = AutoPipelineForImage2Image if kind == "img2img" else AutoPipelineForInpainting
            pipe = loaded.variants[kind] = auto.from_pipe(loaded.base)
        return pipe

    def _load(self, name: str, model: Model) -> _Loaded:
        found = getattr(diffusers, model.pipeline, None)
        if not (isinstance(found, type) and issubclass(found, DiffusionPipeline)):
            raise ProcessorError("internal", f"diffusers has no pipeline {model.pipeline!r}")
        cls: Any = found
        device = device_of(model)
        try:
            pipe = cls.from_pretrained(
                str(model.path), dtype=dtype_of(model, device), local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise ProcessorError(
                "internal", f"cannot load model {name!r} from {model.path}: {exc}"
            ) from exc
        if model.scheduler is not None:
            scheduler = getattr(diffusers, model.scheduler, None)
            if scheduler is None:
                raise ProcessorError("internal", f"diffusers has no scheduler {model.scheduler!r}")
            pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device)
        size = _bytes_of(pipe)
        self._make_room(size)
        loaded = self._loaded[name] = _Loaded({"base": pipe}, size)
        return loaded

    def _make_room(self, size: int) -> None:
        """Evict the least recently used models until ``size`` more bytes fit the budget."""
        budget = self._registry.budget_bytes
        if not budget:
            return
        while self._loaded and sum(m.size for m in self._loaded.values()) + size > budget:
            _, evicted = self._loaded.popitem(last=False)
            evicted.variants.clear()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def use_loras(self, name: str, loras: list[Lora]) -> None:
        """Weight ``model``'s LoRA adapters as ``loras`` asks (loading new ones), or none."""
        loaded = self._loaded[name]
        base = loaded.base
        for lora in loras:
            if lora.adapter in loaded.adapters:
                continue
            try:
                state = safetensors.torch.load(lora.data)
                base.load_lora_weights(state, adapter_name=lora.adapter)
            except Exception as exc:  # a file that is no LoRA of this model
                raise ProcessorError(
                    "validation", f"the LoRA weights do not fit model {name!r}: {exc}"
                ) from exc
            loaded.adapters.add(lora.adapter)
        if loras:
            base.enable_lora()
            base.set_adapters([x.adapter for x in loras], adapter_weights=[x.weight for x in loras])
        elif loaded.adapters:
            base.disable_lora()


def runtime_of(registry: ModelRegistry, ctx: ProcessorContext) -> Runtime:
    """The worker's runtime for ``registry`` (kept in the worker between tasks)."""
    key = "diffusion:" + hashlib.sha256(registry.model_dump_json().encode()).hexdigest()
    found = ctx.keep.get(key)
    if not isinstance(found, Runtime):
        found = ctx.keep[key] = Runtime(registry)
    return found


@contextlib.contextmanager
def device_turn(device: torch.device) -> Iterator[None]:
    """One task at a time on a CUDA device, across every process of this machine."""
    if device.type != "cuda":
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    path = Path(tempfile.gettempdir()) / f"sartiq-diffusion-cuda{index}.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def step_reporter(
    ctx: ProcessorContext, steps: int, start: float, span: float
) -> Callable[..., dict[str, Any]]:
    """A ``callback_on_step_end`` reporting progress from ``start`` over ``span``.

    A cancel raises from ``ctx.progress``: the pipeline stops between two steps.
    """
    total = max(1, steps)

    def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        ctx.progress(start + span * min(1.0, (step + 1) / total))
        return {}

    return on_step


def generator(seed: int) -> torch.Generator:
    """The task's random source: on the CPU, so a seed means the same noise on any device."""
    return torch.Generator(device="cpu").manual_seed(seed % 2**63)


def run(pipe: DiffusionPipeline, device: torch.device, **arguments: Any) -> Any:
    """Call the pipeline under inference mode, in the device's turn."""
    if device.type == "cuda":  # the same kernels every time: a seed gives the same bytes
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    with device_turn(device), torch.inference_mode():
        return pipe(**arguments)


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
