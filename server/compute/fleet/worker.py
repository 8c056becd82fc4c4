"""The fleet's Celery workers: each task delivery claims its record, runs, writes once.

``sartiq-compute-worker`` (``python -m server.compute.fleet.worker``) runs a Celery worker
over ``SARTIQ_COMPUTE_SERVER__BROKER_URL``: ``--concurrency N`` processes (one per GPU, or
N on the CPU), consuming the queues of the task types it is given (``--task-types``; all by
default), one queue per task type so short tasks never wait behind videos on a worker
that does not take videos.

A delivery (the message names only the task id; the record holds the rest):

1. claims the record (``records.CLAIM``): a finished or cancelled task is done with (a
   cancelled pending task never starts); a task another live worker holds is retried
   after that claim's lease; otherwise this worker holds it for ``lease_s``, renewed by a
   heartbeat thread every third of it;
2. runs the task type's processor, its ``progress`` calls written to the record (which
   publishes them) and answered by a stop when the task was cancelled or the claim lost;
3. stores each output, probed first, in object storage under its SHA-256 (so a task run
   again after a takeover writes the same blobs) and finishes the record naming them;
   a worker that lost its claim writes nothing.

Late acknowledgement: the message is acknowledged when its delivery ends, so a worker that
dies mid-task leaves it to be delivered again: at once when a pool process dies
(``task_reject_on_worker_lost``), after ``redeliver_after_s`` (Redis's visibility timeout)
when the whole worker dies, at once on RabbitMQ when its connection drops. The next
delivery waits out the dead worker's claim (at most ``lease_s``) and runs the task again.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import Celery
from celery.signals import (
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from kombu import Exchange, Queue

from server.compute.base import ComputeError, OutputFile
from server.compute.diffusion import providers
from server.compute.diffusion.models import ModelRegistryError
from server.compute.fleet.records import (
    CLAIM,
    FINISH,
    HEARTBEAT,
    RENEW,
    Keys,
    TaskRecord,
    outputs_json,
)
from server.compute.outputs import verified
from server.compute.processors.tasks import default_registry
from server.compute.registry import ProcessorContext, ProcessorError, ProcessorRegistry
from server.compute.server.board import NamedOutput
from server.compute.server.settings import ComputeServerSettings
from server.config import MediaSettings
from server.domain.enums import TaskType
from server.logs import configure
from server.media.backends import open_storage
from server.media.storage import ArtifactStorage, StorageError

log = logging.getLogger(__name__)
RUN_TASK = "sartiq.compute.run"
_PROGRESS_EVERY_S = 0.2
# How soon a delivery that met a Redis or storage failure is tried again.
_INFRASTRUCTURE_RETRY_S = 2.0


def queue_name(settings: ComputeServerSettings, task_type: TaskType) -> str:
    """The queue a task type's deliveries wait in."""
    return f"{settings.namespace.replace(':', '.')}.{task_type.value.lower()}"


def make_celery(
    settings: ComputeServerSettings, runner: Callable[[], Runner] | None = None
) -> Celery:
    """The fleet's Celery app; with ``runner`` (workers), its one task is registered.

    API servers only send (``send_task`` by name), so they build it without a runner.
    """
    app = Celery("sartiq-compute", broker=settings.broker_url, set_as_current=False)
    exchange = Exchange(settings.namespace.replace(":", "."), type="direct")
    restore_every = max(1, int(settings.redeliver_after_s / 4))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        # Each queue bound by its own name, so a delivery reaches that queue alone.
        task_queues=[
            Queue(queue_name(settings, t), exchange, routing_key=queue_name(settings, t))
            for t in TaskType
        ],
        task_default_exchange=exchange.name,
        task_default_queue=queue_name(settings, TaskType.GENERATION),
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.redeliver_after_s,
            "unacked_restore_interval": restore_every,
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
    )
    if runner is not None:

        def run(self: Any, task_id: str) -> None:
            try:
                retry_in = runner().run(task_id)
            except (redis.RedisError, StorageError) as exc:
                # The records or the storage failed us: deliver it again (its claim, if
                # this delivery took one, lapses first). Never acknowledged as done.
                log.warning("task %s delivered again: %s", task_id, exc)
                retry_in = min(settings.lease_s, _INFRASTRUCTURE_RETRY_S)
            if retry_in is not None:
                raise self.retry(countdown=retry_in)

        app.task(name=RUN_TASK, bind=True, max_retries=None, acks_late=True)(run)

    return app


class _StopError(Exception):
    """Raised inside a processor: the task was cancelled, or this worker lost its claim."""

    def __init__(self, lost: bool) -> None:
        super().__init__("claim lost" if lost else "cancelled")
        self.lost = lost


class Runner:
    """One worker process's connections and processors; runs one delivery at a time."""

    def __init__(self, settings: ComputeServerSettings, processors: ProcessorRegistry) -> None:
        self._settings = settings
        self._processors = processors
        self._keep: dict[str, Any] = {}  # what processors keep between this process's tasks
        self._keys = Keys(settings.namespace)
        self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        self._claim = self._redis.register_script(CLAIM)
        self._renew = self._redis.register_script(RENEW)
        self._finish = self._redis.register_script(FINISH)
        self._heartbeat = self._redis.register_script(HEARTBEAT)
        self._lease_ms = int(settings.lease_s * 1000)
        self._ttl_ms = int(settings.retain_finished_s * 1000)
        # The storage is async; this process's own loop runs each call (never concurrently).
        self._loop = asyncio.new_event_loop()
        self._storage: ArtifactStorage = open_storage(settings.storage, MediaSettings())
        self._loop.run_until_complete(self._storage.start())
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._alive = threading.Event()
        self._beats = threading.Thread(target=self._beat, name="fleet-heartbeat", daemon=True)
        self._beats.start()

    def _beat(self) -> None:
        """Tell the API servers this process is alive (``/health`` counts the workers)."""
        while not self._alive.is_set():
            try:
                self._heartbeat(keys=[self._keys.workers], args=[self.name, self._lease_ms])
            except redis.RedisError as exc:
                log.warning("worker heartbeat failed: %s", exc)
            self._alive.wait(self._settings.lease_s / 3)

    def run(self, task_id: str) -> float | None:
        """Run one delivery of ``task_id``; seconds until it should be tried again, or None."""
        token = f"{self.name}/{uuid.uuid4().hex}"
        keys = self._keys
        outcome, detail = (
            part.decode()
            for part in self._claim(
                keys=[
                    keys.task(task_id),
                    keys.pending,
                    keys.running,
                    keys.ended,
                    keys.key(""),
                    keys.events(task_id),
                ],
                args=[token, self._lease_ms, self._ttl_ms],
            )
        )
        if outcome == "held":
            return min(int(detail) / 1000 + 0.05, self._settings.lease_s)
        if outcome != "claimed":
            log.info("task %s not run: %s", task_id, outcome)
            return None
        record = TaskRecord.from_hash(self._redis.hgetall(keys.task(task_id)))
        if int(detail) > 1:
            log.warning("task %s taken over (attempt %s)", task_id, detail)
        with self._holding(task_id, token) as held:
            status, outputs, error = self._execute(record, held)
        if status == "lost":
            log.warning("task %s: claim lost, its result is dropped", task_id)
            return None
        finished = self._finish(
            keys=[
                keys.task(task_id),
                keys.running,
                keys.ended,
                keys.key(""),
                keys.events(task_id),
            ],
            args=[token, status, outputs_json(outputs), *error, self._ttl_ms],
        )
        if finished.decode() == "lost":
            log.warning("task %s: claim lost before its result was written", task_id)
        return None

    @contextmanager
    def _holding(self, task_id: str, token: str) -> Iterator[Callable[[float | None], None]]:
        """Renew the claim every third of the lease while the task runs.

        Yields the processor's progress report: it writes the progress (at most every
        ``_PROGRESS_EVERY_S``) and raises ``_StopError`` once the task is cancelled or the claim
        is lost, which the heartbeat may have found out in between.
        """
        keys = [self._keys.task(task_id), self._keys.events(task_id)]
        stop: list[bool] = []  # [lost]
        done = threading.Event()
        lock = threading.Lock()

        def renew(progress: float | None) -> None:
            with lock:
                answer = self._renew(
                    keys=keys, args=[token, self._lease_ms, "" if progress is None else progress]
                ).decode()
            if answer != "ok" and not stop:
                stop.append(answer == "lost")

        def beat() -> None:
            while not done.wait(self._settings.lease_s / 3):
                try:
                    renew(None)
                except redis.RedisError as exc:
                    log.warning("claim renewal of %s failed: %s", task_id, exc)

        last = [0.0]

        def report(value: float | None) -> None:
            if stop:
                raise _StopError(stop[0])
            now = time.monotonic()
            if value is not None and (now - last[0] >= _PROGRESS_EVERY_S or value >= 1.0):
                last[0] = now
                renew(min(max(value, 0.0), 1.0))
                if stop:
                    raise _StopError(stop[0])

        beating = threading.Thread(target=beat, name=f"claim:{task_id}", daemon=True)
        beating.start()
        try:
            yield report
        finally:
            done.set()
            beating.join()

    def _execute(
        self, record: TaskRecord, report: Callable[[float | None], None]
    ) -> tuple[str, list[NamedOutput], tuple[str, str]]:
        """(status, outputs, (error category, message)) of running the record's task.

        Raises:
            StorageError: an input could not be read, or an output written, for now.
        """
        inputs = set(record.inputs)

        def resolve(reference: str) -> bytes:
            sha = reference.removeprefix("artifact:")
            if sha not in inputs:
                raise FileNotFoundError(f"not an input of this task: {reference[:80]!r}")
            return self._loop.run_until_complete(self._storage.read(sha))

        context = ProcessorContext(
            resolve=resolve,
            progress=report,
            max_input_pixels=self._settings.max_input_pixels,
            keep=self._keep,
        )
        try:
            processor = self._processors.get(TaskType(record.task_type))
            report(None)  # a cancel that came between the claim and now
            produced = verified(processor(record.params, context))
            report(None)
        except _StopError as stop:
            return ("lost" if stop.lost else "cancelled"), [], ("", "")
        except ProcessorError as exc:
            return "failed", [], (exc.category, str(exc))
        except ComputeError as exc:
            return "failed", [], (exc.category.value, exc.message)
        except StorageError:
            raise  # an input could not be read for now: the delivery is tried again
        except Exception:
            log.exception("processor for %s failed", record.task_type)
            return "failed", [], ("internal", "processor failed unexpectedly")
        return "completed", [self._store(output) for output in produced], ("", "")

    def _store(self, output: OutputFile) -> NamedOutput:
        blob = self._loop.run_until_complete(self._storage.put(output.data, output.mime_type))
        return NamedOutput.of(output, blob.sha256)

    def close(self) -> None:
        """Stop the heartbeat and release the connections; never raises."""
        self._alive.set()
        try:
            self._loop.run_until_complete(self._storage.aclose())
            self._loop.close()
            self._redis.close()
        except Exception as exc:  # closing must not raise
            log.warning("worker close: %s", exc)


def load_processors(path: str) -> ProcessorRegistry:
    """The registry ``module:function`` returns (the default: the CPU processors)."""
    if path == "":
        return default_registry()
    module, _, function = path.partition(":")
    factory = getattr(importlib.import_module(module), function)
    registry = factory()
    if not isinstance(registry, ProcessorRegistry):
        raise TypeError(f"{path} returned {type(registry).__name__}, not a ProcessorRegistry")
    return registry


class _ProcessRunner:
    """The runner of the current process, made on first use (each pool process its own)."""

    def __init__(self, settings: ComputeServerSettings) -> None:
        self._settings = settings
        self._runner: Runner | None = None
        self._pid = 0

    def __call__(self) -> Runner:
        if self._runner is None or self._pid != os.getpid():
            base = load_processors(self._settings.processors)
            chosen = providers(self._settings.models, base)
            self._runner = Runner(self._settings, chosen.processors)
            self._pid = os.getpid()
        return self._runner

    def close(self) -> None:
        """Close this process's runner, if it made one; never raises."""
        if self._runner is not None and self._pid == os.getpid():
            self._runner.close()
            self._runner = None


def main(argv: list[str] | None = None) -> None:
    """Parse the settings once and run a Celery worker until SIGTERM (warm shutdown)."""
    parser = argparse.ArgumentParser(prog="sartiq-compute-worker", description=__doc__)
    parser.add_argument("--concurrency", type=int, default=1, help="processes (1 per GPU)")
    parser.add_argument(
        "--task-types",
        default="",
        help="comma-separated task types whose queues it takes (e.g. VIDEO_GENERATION); "
        "all by default",
    )
    parser.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    parser.add_argument("--name", default="", help="the worker's node name (default: host)")
    args = parser.parse_args(argv)
    settings = ComputeServerSettings()
    configure(settings.log_level)
    if not settings.broker_url:
        sys.exit("sartiq-compute-worker: SARTIQ_COMPUTE_SERVER__BROKER_URL is not set")
    try:
        types = [TaskType(t.strip()) for t in args.task_types.split(",") if t.strip()]
    except ValueError as exc:
        sys.exit(f"sartiq-compute-worker: {exc}")
    try:  # the model registry checked once, before any process starts
        providers(settings.models, load_processors(settings.processors))
    except ModelRegistryError as exc:
        sys.exit(f"sartiq-compute-worker: cannot start: {exc}")
    runner = _ProcessRunner(settings)
    app = make_celery(settings, runner)
    if args.pool == "prefork":
        worker_process_init.connect(lambda **_: runner(), weak=False)
        worker_process_shutdown.connect(lambda **_: runner.close(), weak=False)
    else:
        worker_ready.connect(lambda **_: runner(), weak=False)
        worker_shutdown.connect(lambda **_: runner.close(), weak=False)
    queues = ",".join(queue_name(settings, t) for t in (types or list(TaskType)))
    name = args.name or f"sartiq-compute@{socket.gethostname()}-{os.getpid()}"
    app.worker_main(
        [
            "worker",
            f"--loglevel={settings.log_level}",
            f"--concurrency={args.concurrency}",
            f"--pool={args.pool}",
            f"--queues={queues}",
            f"--hostname={name}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


if __name__ == "__main__":
    main()
