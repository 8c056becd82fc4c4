"""The compute server's ASGI app (Starlette): the wire protocol over a local backend.

Tasks run on a ``LocalComputeBackend`` (its own bounded worker pool; cancellation stops
a processor between its steps). A submit is idempotent by its key. Inputs arrive as
``data:`` URIs inside the parameters. Bearer-token auth guards everything but
``/health``, which reports the capacity.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.compute.base import ComputeError, TaskRequest, UnknownComputeTaskError
from server.compute.local import LocalComputeBackend, LocalTask
from server.compute.processors.tasks import default_registry
from server.compute.server.settings import ComputeServerSettings
from server.compute.wire import EVALUATION_PATH, TASKS_PATH, decode_data_uri, is_data_uri
from server.domain.enums import ComputeErrorCategory, Strategy, TaskStatus, TaskType
from server.evaluation.base import EvaluationError, EvaluationInput
from server.evaluation.local import LocalEvaluator

log = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, category: ComputeErrorCategory, message: str) -> JSONResponse:
    return JSONResponse({"error_category": category.value, "error_message": message}, status)


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


class ComputeService:
    """The endpoints, over one local backend and one evaluator."""

    def __init__(self, settings: ComputeServerSettings) -> None:
        self._settings = settings
        self.backend = LocalComputeBackend(
            default_registry(),
            resolve=self._resolve,
            workers=settings.workers,
            max_input_pixels=settings.max_input_pixels,
            retain_finished=settings.retain_finished,
        )
        self._evaluator = LocalEvaluator(
            max_pixels=settings.max_input_pixels, concurrency=settings.workers
        )
        self.tasks_created = 0

    def _resolve(self, reference: str) -> bytes:
        if not is_data_uri(reference):
            raise FileNotFoundError(f"inputs must be data: URIs, got {reference[:40]!r}")
        try:
            return decode_data_uri(reference, self._settings.max_input_bytes)
        except ValueError as exc:
            raise FileNotFoundError(str(exc)) from None

    async def submit(self, request: Request) -> Response:
        """POST /api/v1/tasks/: start a task, or answer the one this key started."""
        body = await _json(request)
        if isinstance(body, Response):
            return body
        try:
            task_type = TaskType(str(body.get("task_type", "")))
        except ValueError:
            return _error(
                400,
                ComputeErrorCategory.UNSUPPORTED,
                f"unknown task_type {body.get('task_type')!r}",
            )
        key = str(request.headers.get("idempotency-key") or body.get("idempotency_key") or "")
        parameters = body.get("parameters")
        if not key or not isinstance(parameters, dict):
            return _error(
                400, ComputeErrorCategory.VALIDATION, "idempotency_key and parameters are required"
            )
        _, waiting = self.backend.load
        if self.backend.existing(key) is None and waiting >= self._settings.max_waiting:
            return _error(429, ComputeErrorCategory.CAPACITY, f"{waiting} tasks are waiting")
        task_request = TaskRequest(
            task_type=task_type,
            params=parameters,
            idempotency_key=key,
            organization=str(body.get("origin_organization") or ""),
        )
        known = self.backend.existing(key)
        try:
            compute_id = await self.backend.submit(task_request)
        except ComputeError as exc:
            return _error(400, exc.category, exc.message)
        if known is None:
            self.tasks_created += 1
        return JSONResponse(self._task(compute_id, self.backend.cell(compute_id)), 201)

    def _task(self, compute_id: str, cell: LocalTask) -> dict[str, Any]:
        category, message = cell.error or (None, None)
        images: list[dict[str, Any]] = []
        videos: list[dict[str, Any]] = []
        for index, output in enumerate(cell.outputs):
            item = {
                "url": f"{TASKS_PATH}{compute_id}/outputs/{index}",
                "mime_type": output.mime_type,
                "width": output.width,
                "height": output.height,
                "seed": output.seed,
                "notes": list(output.notes),
            }
            if output.mime_type.startswith("video/"):
                item |= {"duration_s": output.duration_s, "frame_count": output.frame_count}
                videos.append(item)
            else:
                images.append(item)
        return {
            "id": compute_id,
            "task_type": cell.request.task_type.value,
            "status": cell.status.value.lower(),
            "progress": cell.progress,
            "created_at": _time(cell.created_at),
            "started_at": _time(cell.started_at),
            "completed_at": _time(cell.finished_at),
            "output": {"images": images, "videos": videos},
            "error_category": category,
            "error_message": message,
        }

    async def status(self, request: Request) -> Response:
        """GET /api/v1/tasks/{id}: the task's status, progress, outputs and error."""
        cell = self._cell(request)
        if isinstance(cell, Response):
            return cell
        return JSONResponse(self._task(cell.id, cell))

    async def output(self, request: Request) -> Response:
        """GET /api/v1/tasks/{id}/outputs/{n}: an output's bytes."""
        index = int(request.path_params["index"])
        cell = self._cell(request)
        if isinstance(cell, Response):
            return cell
        if cell.status is not TaskStatus.COMPLETED or not 0 <= index < len(cell.outputs):
            return _error(404, ComputeErrorCategory.NOT_FOUND, f"no output {index}")
        output = cell.outputs[index]
        return Response(output.data, media_type=output.mime_type)

    def _cell(self, request: Request) -> LocalTask | Response:
        """The task the path names, or the 404 answer."""
        try:
            return self.backend.cell(request.path_params["task_id"])
        except UnknownComputeTaskError as exc:
            return _error(404, ComputeErrorCategory.NOT_FOUND, exc.message)

    async def cancel(self, request: Request) -> Response:
        """POST /api/v1/tasks/{id}/cancel: stop it (idempotent); answers the task."""
        cell = self._cell(request)
        if isinstance(cell, Response):
            return cell
        await self.backend.cancel(cell.id)
        return JSONResponse(self._task(cell.id, cell))

    async def evaluate(self, request: Request) -> Response:
        """POST /api/v1/evaluation/: score an image with the local measures."""
        body = await _json(request)
        if isinstance(body, Response):
            return body
        try:
            item = self._evaluation_input(body)
            evaluation = await self._evaluator.evaluate(item)
        except (ValueError, KeyError, TypeError, EvaluationError) as exc:
            return _error(400, ComputeErrorCategory.VALIDATION, f"cannot evaluate: {exc}")
        return JSONResponse(
            {
                "score": evaluation.score,
                "criteria": evaluation.criteria,
                "feedback": evaluation.feedback,
                "measures": evaluation.measures,
            }
        )

    def _evaluation_input(self, body: dict[str, Any]) -> EvaluationInput:
        limit = self._settings.max_input_bytes
        size = body.get("expected_size")
        base = body.get("base")
        return EvaluationInput(
            output=decode_data_uri(str(body["image"]), limit),
            strategy=Strategy(str(body.get("strategy") or Strategy.GENERATE.value)),
            expected_size=None if not size else (int(size[0]), int(size[1])),
            base=None if not base else decode_data_uri(str(base), limit),
            edited_region=str(body.get("edited_region") or "all"),
            expects_face=bool(body.get("expects_face")),
        )

    async def health(self, request: Request) -> Response:
        """GET /health: liveness and capacity."""
        running, waiting = self.backend.load
        capacity = {"workers": self._settings.workers, "running": running, "waiting": waiting}
        return JSONResponse(
            {"status": "ok", "capacity": capacity, "tasks_created": self.tasks_created}
        )


async def _json(request: Request) -> dict[str, Any] | Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, ComputeErrorCategory.VALIDATION, "the body is not JSON")
    if not isinstance(body, dict):
        return _error(400, ComputeErrorCategory.VALIDATION, "the body must be a JSON object")
    return body


def _authenticated(handler: Handler, token: str) -> Handler:
    expected = f"Bearer {token}".encode()

    async def guarded(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return _error(401, ComputeErrorCategory.VALIDATION, "a valid bearer token is required")
        return await handler(request)

    return guarded


def create_app(settings: ComputeServerSettings) -> Starlette:
    """The ASGI app; its lifespan stops the worker pool."""
    service = ComputeService(settings)

    def guard(handler: Handler) -> Handler:
        return _authenticated(handler, settings.token) if settings.token else handler

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.shield(service.backend.aclose())

    routes = [
        Route(TASKS_PATH, guard(service.submit), methods=["POST"]),
        Route(TASKS_PATH + "{task_id}", guard(service.status), methods=["GET"]),
        Route(TASKS_PATH + "{task_id}/outputs/{index:int}", guard(service.output), methods=["GET"]),
        Route(TASKS_PATH + "{task_id}/cancel", guard(service.cancel), methods=["POST"]),
        Route(EVALUATION_PATH, guard(service.evaluate), methods=["POST"]),
        Route("/health", service.health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
