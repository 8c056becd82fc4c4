"""The compute server's ASGI app (Starlette): the wire protocol over a local backend.

Tasks run on a ``LocalComputeBackend`` (its own bounded worker pool; cancellation stops
a processor between its steps; outputs are probed before a task completes). A submit is
idempotent by its key, and a task can be looked up by that key. Every request body is
validated and every answer built through the models of ``wire``; each output is named
with its SHA-256 and size. Inputs arrive as ``data:`` URIs inside the parameters.
Bearer-token auth guards everything but ``/health``, which reports the capacity and the
task counters (created, ended).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.compute.base import ComputeError, TaskRequest, UnknownComputeTaskError
from server.compute.local import LocalComputeBackend, LocalTask
from server.compute.processors.tasks import default_registry
from server.compute.server.settings import ComputeServerSettings
from server.compute.wire import (
    EVALUATION_PATH,
    HEALTH_PATH,
    TASKS_PATH,
    Capacity,
    ErrorBody,
    EvaluationAnswer,
    EvaluationRequest,
    HealthAnswer,
    OutputItem,
    SubmitRequest,
    TaskAnswer,
    TaskList,
    TaskOutput,
    WireStatus,
    decode_data_uri,
    describe,
    is_data_uri,
    output_path,
)
from server.domain.enums import ComputeErrorCategory, Strategy, TaskStatus, TaskType
from server.evaluation.base import EvaluationError, EvaluationInput
from server.evaluation.local import LocalEvaluator

log = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]
M = TypeVar("M", bound=BaseModel)
_WIRE_STATUS: dict[TaskStatus, WireStatus] = {
    TaskStatus.PENDING: "pending",
    TaskStatus.RUNNING: "running",
    TaskStatus.COMPLETED: "completed",
    TaskStatus.FAILED: "failed",
    TaskStatus.CANCELLED: "cancelled",
}


def _answer(body: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), status)


def _error(status: int, category: ComputeErrorCategory, message: str) -> JSONResponse:
    return _answer(ErrorBody(error_category=category.value, error_message=message), status)


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

    def _resolve(self, reference: str) -> bytes:
        if not is_data_uri(reference):
            raise FileNotFoundError(f"inputs must be data: URIs, got {reference[:40]!r}")
        try:
            return decode_data_uri(reference, self._settings.max_input_bytes)
        except ValueError as exc:
            raise FileNotFoundError(str(exc)) from None

    async def submit(self, request: Request) -> Response:
        """POST /api/v1/tasks/: start a task, or answer the one this key started."""
        body = await _body(request, SubmitRequest)
        if isinstance(body, Response):
            return body
        try:
            task_type = TaskType(body.task_type)
        except ValueError:
            return _error(
                400, ComputeErrorCategory.UNSUPPORTED, f"unknown task_type {body.task_type!r}"
            )
        key = request.headers.get("idempotency-key") or body.idempotency_key
        if key != body.idempotency_key:
            return _error(
                400, ComputeErrorCategory.VALIDATION, "the Idempotency-Key header and body differ"
            )
        _, waiting = self.backend.load
        if self.backend.existing(key) is None and waiting >= self._settings.max_waiting:
            return _error(429, ComputeErrorCategory.CAPACITY, f"{waiting} tasks are waiting")
        task_request = TaskRequest(
            task_type=task_type,
            params=body.parameters,
            idempotency_key=key,
            organization=body.origin_organization,
        )
        try:
            compute_id = await self.backend.submit(task_request)
        except ComputeError as exc:
            return _error(400, exc.category, exc.message)
        return _answer(_task(self.backend.cell(compute_id)), 201)

    async def lookup(self, request: Request) -> Response:
        """GET /api/v1/tasks/?idempotency_key=K: the task that key created, if any."""
        key = request.query_params.get("idempotency_key", "")
        if not key:
            return _error(400, ComputeErrorCategory.VALIDATION, "idempotency_key is required")
        compute_id = self.backend.existing(key)
        tasks = [] if compute_id is None else [_task(self.backend.cell(compute_id))]
        return _answer(TaskList(tasks=tasks))

    async def status(self, request: Request) -> Response:
        """GET /api/v1/tasks/{id}: the task's status, progress, outputs and error."""
        cell = self._cell(request)
        if isinstance(cell, Response):
            return cell
        return _answer(_task(cell))

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
        return _answer(_task(cell))

    async def evaluate(self, request: Request) -> Response:
        """POST /api/v1/evaluation/: score an image with the local measures."""
        body = await _body(request, EvaluationRequest)
        if isinstance(body, Response):
            return body
        try:
            item = self._evaluation_input(body)
            evaluation = await self._evaluator.evaluate(item)
        except (ValueError, EvaluationError) as exc:
            return _error(400, ComputeErrorCategory.VALIDATION, f"cannot evaluate: {exc}")
        return _answer(
            EvaluationAnswer(
                score=evaluation.score,
                criteria=evaluation.criteria,
                feedback=evaluation.feedback,
                measures=evaluation.measures,
            )
        )

    def _evaluation_input(self, body: EvaluationRequest) -> EvaluationInput:
        """Raises ValueError for an input that cannot be decoded."""
        limit = self._settings.max_input_bytes
        return EvaluationInput(
            output=decode_data_uri(body.image, limit),
            strategy=Strategy(body.strategy),
            expected_size=body.expected_size,
            base=None if not body.base else decode_data_uri(body.base, limit),
            edited_region=body.edited_region,
            expects_face=body.expects_face,
        )

    async def health(self, request: Request) -> Response:
        """GET /health: liveness, capacity and the task counters."""
        running, waiting = self.backend.load
        capacity = Capacity(workers=self._settings.workers, running=running, waiting=waiting)
        return _answer(
            HealthAnswer(
                status="ok",
                capacity=capacity,
                tasks_created=self.backend.created,
                tasks_ended=self.backend.ended,
            )
        )


def _task(cell: LocalTask) -> TaskAnswer:
    """The wire answer for a task: its state, and each output named by hash and size."""
    category, message = cell.error or (None, None)
    images: list[OutputItem] = []
    videos: list[OutputItem] = []
    for index, (output, digest) in enumerate(zip(cell.outputs, cell.digests, strict=True)):
        item = OutputItem(
            url=output_path(cell.id, index),
            sha256=digest,
            size=len(output.data),
            seed=output.seed,
            mime_type=output.mime_type,
            width=output.width,
            height=output.height,
            duration_s=output.duration_s,
            frame_count=output.frame_count,
            notes=list(output.notes),
        )
        (videos if output.mime_type.startswith("video/") else images).append(item)
    return TaskAnswer(
        id=cell.id,
        idempotency_key=cell.request.idempotency_key,
        task_type=cell.request.task_type.value,
        status=_WIRE_STATUS[cell.status],
        progress=cell.progress,
        created_at=cell.created_at,
        started_at=cell.started_at,
        completed_at=cell.finished_at,
        output=TaskOutput(images=images, videos=videos),
        error_category=category,
        error_message=message,
    )


async def _body(request: Request, model: type[M]) -> M | Response:
    """The request body as ``model``, or the 400 answer naming what is wrong."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        return _error(400, ComputeErrorCategory.VALIDATION, f"bad request body: {describe(exc)}")


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
        Route(TASKS_PATH, guard(service.lookup), methods=["GET"]),
        Route(TASKS_PATH + "{task_id}", guard(service.status), methods=["GET"]),
        Route(TASKS_PATH + "{task_id}/outputs/{index:int}", guard(service.output), methods=["GET"]),
        Route(TASKS_PATH + "{task_id}/cancel", guard(service.cancel), methods=["POST"]),
        Route(EVALUATION_PATH, guard(service.evaluate), methods=["POST"]),
        Route(HEALTH_PATH, service.health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
