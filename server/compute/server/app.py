"""The compute server's ASGI app (Starlette): the wire protocol over a task board.

The board is the embedded one (tasks in this process, run by the local backend's pool)
unless a broker is configured, then the fleet's (task records in Redis shared by every API
server, Celery workers, outputs in object storage): see ``board``. A submit is idempotent
by its key, and a task can be looked up by that key. Every request body is validated and
every answer built through the models of ``wire``; each output is named with its SHA-256
and size. Inputs arrive as ``data:`` URIs inside the parameters. Bearer-token auth guards
everything but ``/health``, which reports the capacity, the task counters (created,
ended) and the event streams open.

A task's events (``GET /api/v1/tasks/{id}/events``) are served with sse-starlette's
``EventSourceResponse`` over the board's ``follow``: it formats the events, sends the
``: keep-alive`` comments on its own timer, and stops the stream (closing ``follow``) when
the client disconnects or the server shuts down (it hooks uvicorn's exit signal for that).
The unknown-task 404 is answered before the stream starts, from ``follow``'s first step.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.compute.base import ComputeError, TaskRequest, UnknownComputeTaskError
from server.compute.server.board import TaskBoard
from server.compute.server.settings import ComputeServerSettings
from server.compute.wire import (
    EVALUATION_PATH,
    EVENTS_KEEPALIVE_S,
    HEALTH_PATH,
    TASK_EVENT,
    TASKS_PATH,
    ErrorBody,
    EvaluationAnswer,
    EvaluationRequest,
    HealthAnswer,
    SubmitRequest,
    TaskAnswer,
    TaskList,
    decode_data_uri,
    describe,
)
from server.domain.enums import ComputeErrorCategory, Strategy, TaskType
from server.evaluation.base import EvaluationError, EvaluationInput
from server.evaluation.local import LocalEvaluator

log = logging.getLogger(__name__)
Handler = Callable[[Request], Awaitable[Response]]
M = TypeVar("M", bound=BaseModel)
# The HTTP status each refusal of a submit answers with.
_SUBMIT_STATUS = {
    ComputeErrorCategory.CAPACITY: 429,
    ComputeErrorCategory.TRANSIENT: 503,
}


def _answer(body: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), status)


def _error(status: int, category: ComputeErrorCategory, message: str) -> JSONResponse:
    return _answer(ErrorBody(error_category=category.value, error_message=message), status)


def _unknown(exc: UnknownComputeTaskError) -> JSONResponse:
    return _error(404, ComputeErrorCategory.NOT_FOUND, exc.message)


def _unavailable(exc: ComputeError) -> JSONResponse:
    return _error(_SUBMIT_STATUS.get(exc.category, 500), exc.category, exc.message)


class ComputeService:
    """The endpoints, over one task board and one evaluator."""

    def __init__(self, settings: ComputeServerSettings, board: TaskBoard) -> None:
        self._settings = settings
        self.board = board
        self._evaluator = LocalEvaluator(
            max_pixels=settings.max_input_pixels, concurrency=settings.workers
        )
        self.event_streams = 0  # open now

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
        task_request = TaskRequest(
            task_type=task_type,
            params=body.parameters,
            idempotency_key=key,
            organization=body.origin_organization,
        )
        try:
            task = await self.board.submit(task_request)
        except ComputeError as exc:
            status = _SUBMIT_STATUS.get(exc.category, 400)
            return _error(status, exc.category, exc.message)
        return _answer(task, 201)

    async def lookup(self, request: Request) -> Response:
        """GET /api/v1/tasks/?idempotency_key=K: the task that key created, if any."""
        key = request.query_params.get("idempotency_key", "")
        if not key:
            return _error(400, ComputeErrorCategory.VALIDATION, "idempotency_key is required")
        try:
            task = await self.board.find(key)
        except ComputeError as exc:
            return _unavailable(exc)
        return _answer(TaskList(tasks=[] if task is None else [task]))

    async def status(self, request: Request) -> Response:
        """GET /api/v1/tasks/{id}: the task's status, progress, outputs and error."""
        try:
            return _answer(await self.board.get(request.path_params["task_id"]))
        except UnknownComputeTaskError as exc:
            return _unknown(exc)
        except ComputeError as exc:
            return _unavailable(exc)

    async def events(self, request: Request) -> Response:
        """GET /api/v1/tasks/{id}/events: the task at every change, as server-sent events."""
        follow = self.board.follow(request.path_params["task_id"])
        try:
            first = await anext(follow)
        except UnknownComputeTaskError as exc:
            await _close(follow)
            return _unknown(exc)
        except ComputeError as exc:
            await _close(follow)
            return _unavailable(exc)
        return EventSourceResponse(
            self._task_events(first, follow),
            ping=EVENTS_KEEPALIVE_S,
            ping_message_factory=lambda: ServerSentEvent(comment="keep-alive"),
        )

    async def _task_events(
        self, first: TaskAnswer, rest: AsyncIterator[TaskAnswer]
    ) -> AsyncIterator[ServerSentEvent]:
        """One event per answer, numbered from 1; ``rest`` is closed however it ends."""
        self.event_streams += 1
        try:
            yield _event(1, first)
            number = 1
            async for answer in rest:
                number += 1
                yield _event(number, answer)
        finally:
            self.event_streams -= 1
            await _close(rest)

    async def output(self, request: Request) -> Response:
        """GET /api/v1/tasks/{id}/outputs/{n}: an output's bytes."""
        index = int(request.path_params["index"])
        try:
            output = await self.board.output(request.path_params["task_id"], index)
        except UnknownComputeTaskError as exc:
            return _unknown(exc)
        except ComputeError as exc:
            return _unavailable(exc)
        if output is None:
            return _error(404, ComputeErrorCategory.NOT_FOUND, f"no output {index}")
        return Response(output.data, media_type=output.mime_type)

    async def cancel(self, request: Request) -> Response:
        """POST /api/v1/tasks/{id}/cancel: stop it (idempotent); answers the task."""
        try:
            return _answer(await self.board.cancel(request.path_params["task_id"]))
        except UnknownComputeTaskError as exc:
            return _unknown(exc)
        except ComputeError as exc:
            return _unavailable(exc)

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
        try:
            capacity, created, ended = await self.board.capacity()
        except ComputeError as exc:
            return _unavailable(exc)
        return _answer(
            HealthAnswer(
                status="ok",
                capacity=capacity,
                tasks_created=created,
                tasks_ended=ended,
                event_streams=self.event_streams,
                providers=self.board.serving,
            )
        )


def _event(number: int, answer: TaskAnswer) -> ServerSentEvent:
    return ServerSentEvent(answer.model_dump_json(), event=TASK_EVENT, id=str(number))


async def _close(answers: AsyncIterator[TaskAnswer]) -> None:
    """Close a board's ``follow`` (an async generator) before it ran to its end."""
    aclose = getattr(answers, "aclose", None)
    if aclose is not None:
        await aclose()


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


def open_board(settings: ComputeServerSettings) -> TaskBoard:
    """The fleet's board when a broker is configured, else the embedded one."""
    if settings.broker_url:
        from server.compute.fleet.board import FleetBoard  # celery and redis: on use

        return FleetBoard(settings)
    from server.compute.server.embedded import EmbeddedBoard

    return EmbeddedBoard(settings)


def create_app(settings: ComputeServerSettings, board: TaskBoard | None = None) -> Starlette:
    """The ASGI app; its lifespan starts the board and closes it."""
    service = ComputeService(settings, board or open_board(settings))

    def guard(handler: Handler) -> Handler:
        return _authenticated(handler, settings.token) if settings.token else handler

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.board.start()
        try:
            yield
        finally:
            await asyncio.shield(service.board.aclose())

    routes = [
        Route(TASKS_PATH, guard(service.submit), methods=["POST"]),
        Route(TASKS_PATH, guard(service.lookup), methods=["GET"]),
        Route(TASKS_PATH + "{task_id}", guard(service.status), methods=["GET"]),
        Route(TASKS_PATH + "{task_id}/events", guard(service.events), methods=["GET"]),
        Route(TASKS_PATH + "{task_id}/outputs/{index:int}", guard(service.output), methods=["GET"]),
        Route(TASKS_PATH + "{task_id}/cancel", guard(service.cancel), methods=["POST"]),
        Route(EVALUATION_PATH, guard(service.evaluate), methods=["POST"]),
        Route(HEALTH_PATH, service.health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
