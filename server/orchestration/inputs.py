"""A task's image inputs, made ready just before it is submitted, and chained after.

At create a task's parameters already name ``artifact:`` inputs where the request's
references could be resolved then. Two kinds wait until the task runs:

* ``file://`` and ``http(s)://`` images are fetched, checked (PNG, JPEG or WebP within
  the size and pixel limits), stored as artifacts of the organization, and named by
  ``artifact:<sha256>`` from then on;
* ``step:<n>``, the output of an earlier step of the same chain, is replaced by that
  output's ``artifact:`` the moment the step completes.

Each change is recorded with the task's new parameters, so what compute receives is
always what the task shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from server.config import MediaSettings
from server.domain.errors import Violations
from server.domain.model import Artifact, ComputeTask, PlannedStep, Prediction, ResourceError
from server.media.fetch import FetchError, InputFetcher
from server.media.images import InvalidImageError, probe_image
from server.media.references import (
    FileRef,
    ReferencePolicy,
    UrlRef,
    is_fetched,
    parse_reference,
)
from server.media.storage import ArtifactStorage, StorageError
from server.orchestration.live import LiveGeneration

# The parameter keys whose values (a string or a list of them) are image references.
IMAGE_KEYS = frozenset({"base_image", "reference_images", "background_image", "images"})


def _map_images(params: dict[str, Any], change: Callable[[str, str], str]) -> dict[str, Any]:
    """A copy of ``params`` with every image reference passed through ``change(path, ref)``."""

    def walk(value: Any, path: str, image: bool) -> Any:
        if isinstance(value, dict):
            return {
                k: walk(v, f"{path}.{k}" if path else k, k in IMAGE_KEYS) for k, v in value.items()
            }
        if isinstance(value, list):
            return [walk(item, f"{path}[{i}]", image) for i, item in enumerate(value)]
        if image and isinstance(value, str) and value:
            return change(path, value)
        return value

    result: dict[str, Any] = walk(params, "", False)
    return result


def image_references(params: dict[str, Any]) -> list[tuple[str, str]]:
    """Every image reference in ``params`` with its path (``base_image``, ...), in order."""
    found: list[tuple[str, str]] = []

    def note(path: str, reference: str) -> str:
        found.append((path, reference))
        return reference

    _map_images(params, note)
    return found


def input_hashes(params: dict[str, Any]) -> list[str]:
    """The sha256 of every ``artifact:`` image the parameters name, in order."""
    return [
        ref.removeprefix("artifact:")
        for _, ref in image_references(params)
        if ref.startswith("artifact:")
    ]


class InputPreparer:
    """Fetches a task's external images and chains step outputs; one per engine."""

    def __init__(
        self,
        fetcher: InputFetcher,
        files: ArtifactStorage,
        policy: ReferencePolicy,
        media: MediaSettings,
    ) -> None:
        self._fetcher = fetcher
        self._files = files
        self._policy = policy
        self._max_bytes = media.max_input_bytes
        self._max_pixels = media.max_input_pixels

    async def prepare(self, live: LiveGeneration, task: ComputeTask) -> ResourceError | None:
        """Fetch and store every ``file://``/``http(s)://`` input of ``task``, in order.

        Returns the error that fails the task when one cannot be used, else None. The
        stop token is raced against each fetch.

        Raises:
            Stopped: the generation was cancelled or expired while fetching.
        """
        fetched: dict[str, str] = {}
        for path, reference in image_references(task.params):
            if not is_fetched(reference) or reference in fetched:
                continue
            outcome = await live.token.race(self._fetch(live, path, reference))
            if isinstance(outcome, ResourceError):
                return outcome
            fetched[reference] = f"artifact:{outcome.sha256}"
        if fetched:
            params = _map_images(task.params, lambda _, ref: fetched.get(ref, ref))
            names = ", ".join(sorted(fetched))
            live.recorder.task_params(task, params, note=f"fetched {names}")
        return None

    async def _fetch(
        self, live: LiveGeneration, path: str, reference: str
    ) -> Artifact | ResourceError:
        field = f"parameters.{path}"
        ref = parse_reference(reference, field, Violations(), self._policy)
        if not isinstance(ref, FileRef | UrlRef):
            # The policy changed since the create (e.g. a root was removed).
            return ResourceError.input_unavailable(
                field, "forbidden", f"{reference} is no longer allowed by this server's policy"
            )
        try:
            data = await self._fetcher.fetch(ref)
        except FetchError as exc:
            return ResourceError.input_unavailable(field, exc.reason, str(exc))
        try:
            info = await asyncio.to_thread(
                probe_image, data, max_bytes=self._max_bytes, max_pixels=self._max_pixels
            )
        except InvalidImageError as exc:
            return ResourceError.input_unavailable(field, "invalid_image", f"{reference}: {exc}")
        try:
            blob = await self._files.put(data, info.mime_type)
        except StorageError as exc:
            return ResourceError.input_unavailable(
                field, "storage_unavailable", f"{reference} was fetched but not stored: {exc}"
            )
        artifact = blob.image_artifact(info)
        live.recorder.artifact_stored(artifact)
        return artifact


def reuse_fetched(step: PlannedStep, task: ComputeTask) -> PlannedStep:
    """``step`` with each ``file://``/``http(s)://`` input replaced by what ``task`` fetched.

    An AGENTIC retry starts from the plan; the first attempt's task of the same step
    already stored those inputs as artifacts, so a retry reads the same bytes.
    """
    fetched = dict(image_references(task.params))

    def change(path: str, reference: str) -> str:
        if is_fetched(reference):
            return fetched.get(path, reference)
        return reference

    return PlannedStep(step.task_type, _map_images(step.params, change))


def chain_output(
    live: LiveGeneration, prediction: Prediction, done: ComputeTask, output: Artifact
) -> None:
    """Give ``done``'s output to the later steps of its chain that read ``step:<n>``."""
    marker = f"step:{done.step}"
    for task in prediction.tasks:
        if task.attempt_number != done.attempt_number or task.step <= done.step or task.done:
            continue
        params = _map_images(
            task.params, lambda _, ref: f"artifact:{output.sha256}" if ref == marker else ref
        )
        if params != task.params:
            live.recorder.task_params(task, params)
