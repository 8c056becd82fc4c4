"""A compute server for replica tests: it holds tasks and counts what each caller asked.

    python tests/holding_compute.py PORT_FILE

It speaks the compute wire protocol (``server/compute/wire.py``), its answers built
through the same models as the project's compute server, but it computes nothing: a
task stays RUNNING until the test releases it (``POST /control/release``), or, in timed
mode (``POST /control/mode``), until ``hold_seconds`` after its submit; then it is
COMPLETED with a small PNG of the asked size. A cancel makes it CANCELLED.

Any bearer token is accepted and names the caller: each replica under test uses its own
token, so every call is attributed to the replica that made it. ``GET /control/state``
tells the test, per task, who submitted it and how many times (every POST of its key,
repeats included), who followed it (status polls), who released it (cancels), and the
lookups by key. Each submit and cancel is noted on stderr with its time. Listens on
127.0.0.1, a free port written to PORT_FILE once it serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from server.compute.fake import tiny_png
from server.compute.wire import (
    HEALTH_PATH,
    TASKS_PATH,
    Capacity,
    ErrorBody,
    HealthAnswer,
    OutputItem,
    SubmitRequest,
    TaskAnswer,
    TaskList,
    TaskOutput,
    WireStatus,
    output_path,
)


@dataclass
class HeldTask:
    """One task: what it was asked, and who did what with it."""

    id: str
    key: str
    task_type: str
    width: int
    height: int
    submitted_by: str
    created_at: datetime
    release_at: float | None  # time.monotonic(); None: held until released
    status: WireStatus = "running"
    output: bytes = b""
    submits: list[str] = field(default_factory=list)  # the caller of every submit of the key
    followers: Counter[str] = field(default_factory=Counter)  # status polls per caller
    cancels: list[str] = field(default_factory=list)  # the caller of every cancel
    completed_at: datetime | None = None

    def settle(self) -> None:
        """Complete the task once its release time has come."""
        if (
            self.status == "running"
            and self.release_at is not None
            and time.monotonic() >= self.release_at
        ):
            self.status = "completed"
            self.output = tiny_png(self.id, self.width, self.height).data
            self.completed_at = datetime.now(UTC)

    def answer(self) -> TaskAnswer:
        self.settle()
        images = []
        if self.status == "completed":
            images.append(
                OutputItem(
                    url=output_path(self.id, 0),
                    sha256=hashlib.sha256(self.output).hexdigest(),
                    size=len(self.output),
                    mime_type="image/png",
                    width=self.width,
                    height=self.height,
                )
            )
        return TaskAnswer(
            id=self.id,
            idempotency_key=self.key,
            task_type=self.task_type,
            status=self.status,
            progress=1.0 if self.status == "completed" else 0.5,
            created_at=self.created_at,
            started_at=self.created_at,
            completed_at=self.completed_at,
            output=TaskOutput(images=images),
        )

    def report(self) -> dict[str, Any]:
        self.settle()
        return {
            "id": self.id,
            "key": self.key,
            "status": self.status,
            "submitted_by": self.submitted_by,
            "submits": self.submits,
            "followers": dict(self.followers),
            "cancels": self.cancels,
        }


class HoldingCompute:
    """The tasks, by id and by idempotency key, and the calls made about them."""

    def __init__(self) -> None:
        self.tasks: dict[str, HeldTask] = {}
        self.by_key: dict[str, HeldTask] = {}
        self.lookups: Counter[str] = Counter()
        self.hold_seconds: float | None = None
        self._ids = itertools.count(1)

    async def submit(self, request: Request) -> Response:
        caller = _caller(request)
        if caller is None:
            return _error(401, "a bearer token is required")
        try:
            body = SubmitRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            return _error(400, f"bad request body: {exc.error_count()} problems")
        if request.headers.get("idempotency-key", body.idempotency_key) != body.idempotency_key:
            return _error(400, "the Idempotency-Key header and body differ")
        task = self.by_key.get(body.idempotency_key)
        if task is None:
            now = time.monotonic()
            task = HeldTask(
                id=f"held-{next(self._ids)}",
                key=body.idempotency_key,
                task_type=body.task_type,
                width=int(body.parameters.get("width", 8)),
                height=int(body.parameters.get("height", 8)),
                submitted_by=caller,
                created_at=datetime.now(UTC),
                release_at=None if self.hold_seconds is None else now + self.hold_seconds,
            )
            self.tasks[task.id] = task
            self.by_key[task.key] = task
        task.submits.append(caller)
        _note(f"submit {task.key} -> {task.id} by {caller} ({len(task.submits)})")
        return _answer(task.answer(), 201)

    async def lookup(self, request: Request) -> Response:
        if _caller(request) is None:
            return _error(401, "a bearer token is required")
        key = request.query_params.get("idempotency_key", "")
        self.lookups[key] += 1
        task = self.by_key.get(key)
        return _answer(TaskList(tasks=[] if task is None else [task.answer()]))

    async def status(self, request: Request) -> Response:
        caller = _caller(request)
        if caller is None:
            return _error(401, "a bearer token is required")
        task = self.tasks.get(request.path_params["task_id"])
        if task is None:
            return _error(404, "no such task", category="not_found")
        task.followers[caller] += 1
        return _answer(task.answer())

    async def output(self, request: Request) -> Response:
        if _caller(request) is None:
            return _error(401, "a bearer token is required")
        task = self.tasks.get(request.path_params["task_id"])
        if task is None or task.status != "completed" or request.path_params["index"] != 0:
            return _error(404, "no such output", category="not_found")
        return Response(task.output, media_type="image/png")

    async def cancel(self, request: Request) -> Response:
        caller = _caller(request)
        if caller is None:
            return _error(401, "a bearer token is required")
        task = self.tasks.get(request.path_params["task_id"])
        if task is None:
            return _error(404, "no such task", category="not_found")
        task.cancels.append(caller)
        _note(f"cancel {task.id} ({task.key}) by {caller}")
        task.settle()
        if task.status == "running":
            task.status = "cancelled"
            task.completed_at = datetime.now(UTC)
        return _answer(task.answer())

    async def health(self, request: Request) -> Response:
        for task in self.tasks.values():
            task.settle()
        running = sum(1 for t in self.tasks.values() if t.status == "running")
        return _answer(
            HealthAnswer(
                status="ok",
                capacity=Capacity(workers=1, running=running, waiting=0),
                tasks_created=len(self.tasks),
                tasks_ended=len(self.tasks) - running,
            )
        )

    # -- control, for the test ----------------------------------------------------------

    async def release(self, request: Request) -> Response:
        """Complete the named held tasks (``{"keys": [...]}``), or all of them (``{}``)."""
        body = await request.json()
        keys = body.get("keys")
        chosen = self.tasks.values() if keys is None else [self.by_key[k] for k in keys]
        now = time.monotonic()
        for task in chosen:
            if task.status == "running":
                task.release_at = now
                task.settle()
        return JSONResponse({"released": len(list(chosen))})

    async def mode(self, request: Request) -> Response:
        """How long tasks are held: ``{"hold_seconds": s}``, or ``null`` until released.

        Tasks submitted from now complete ``s`` after their submit; those held now
        complete ``s`` from now.
        """
        body = await request.json()
        seconds = body.get("hold_seconds")
        self.hold_seconds = None if seconds is None else float(seconds)
        if self.hold_seconds is not None:
            at = time.monotonic() + self.hold_seconds
            for task in self.tasks.values():
                if task.status == "running" and task.release_at is None:
                    task.release_at = at
        return JSONResponse({"hold_seconds": self.hold_seconds})

    async def state(self, request: Request) -> Response:
        return JSONResponse(
            {
                "tasks": [task.report() for task in self.tasks.values()],
                "lookups": dict(self.lookups),
            }
        )


def _note(line: str) -> None:
    """One line on stderr (the test keeps it in compute.log), with the wall-clock time."""
    print(f"{datetime.now(UTC):%H:%M:%S.%f} {line}", file=sys.stderr, flush=True)


def _caller(request: Request) -> str | None:
    given = request.headers.get("authorization", "")
    if not given.startswith("Bearer ") or len(given) <= len("Bearer "):
        return None
    return given[len("Bearer ") :]


def _answer(body: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(body.model_dump(mode="json"), status)


def _error(status: int, message: str, *, category: str = "validation") -> JSONResponse:
    return _answer(ErrorBody(error_category=category, error_message=message), status)


def create_app() -> Starlette:
    compute = HoldingCompute()
    routes = [
        Route(TASKS_PATH, compute.submit, methods=["POST"]),
        Route(TASKS_PATH, compute.lookup, methods=["GET"]),
        Route(TASKS_PATH + "{task_id}", compute.status, methods=["GET"]),
        Route(TASKS_PATH + "{task_id}/outputs/{index:int}", compute.output, methods=["GET"]),
        Route(TASKS_PATH + "{task_id}/cancel", compute.cancel, methods=["POST"]),
        Route(HEALTH_PATH, compute.health, methods=["GET"]),
        Route("/control/release", compute.release, methods=["POST"]),
        Route("/control/mode", compute.mode, methods=["POST"]),
        Route("/control/state", compute.state, methods=["GET"]),
    ]
    return Starlette(routes=routes)


async def serve(port_file: Path) -> None:
    config = uvicorn.Config(
        create_app(), host="127.0.0.1", port=0, log_config=None, access_log=False
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving  # it failed to start: raise why
            return
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    partial = port_file.with_name(f".{port_file.name}.partial")
    partial.write_text(f"{port}\n")
    partial.replace(port_file)  # a reader sees no port or the whole of it
    await serving


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        asyncio.run(serve(Path(sys.argv[1])))
    except KeyboardInterrupt:
        sys.exit(0)
