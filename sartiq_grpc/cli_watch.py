"""``sartiq watch``: a progress bar per prediction, rebuilt from the events, and a summary."""

from __future__ import annotations

import argparse
import sys

from google.protobuf import json_format
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from sartiq_grpc import replay
from sartiq_grpc.cli_failures import one_line
from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, resources_pb2


def _prediction_progress(prediction: resources_pb2.Prediction) -> float:
    """How far a prediction's task chain is, 0 to 1."""
    if prediction.done:
        return 1.0
    tasks = prediction.tasks
    if not tasks:
        return 0.0
    return sum(1.0 if t.done else t.progress for t in tasks) / len(tasks)


async def watch(client: SartiqClient, args: argparse.Namespace) -> None:
    """Follow a generation to its end: JSON lines, or progress bars and then a summary.

    When the stream breaks it says so on stderr and reconnects for up to
    ``--connect-timeout`` seconds (the client then raises ``TransportError``).
    """

    def waiting(why: str) -> None:  # the stream broke: say so, the watch reconnects
        print(one_line(f"sartiq: {args.target}: {why}"), file=sys.stderr, flush=True)

    events = client.watch(args.generation_id, resume_for=args.connect_timeout, on_wait=waiting)
    if args.json:
        async for event in events:
            print(json_format.MessageToJson(event, indent=None), flush=True)
        return
    tree: resources_pb2.Generation | None = None
    bars: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=False),
    ) as progress:
        async for event in events:
            tree = replay.apply(tree, event)
            for prediction in tree.predictions:
                status = enums_pb2.PredictionStatus.Name(prediction.status)
                status = status.removeprefix("PREDICTION_STATUS_").lower()
                if prediction.id not in bars:
                    label = f"prediction {prediction.index}"
                    bars[prediction.id] = progress.add_task(label, total=1.0, status=status)
                progress.update(
                    bars[prediction.id],
                    completed=_prediction_progress(prediction),
                    status=status,
                )
    if tree is not None:
        _print_summary(tree)


def _print_summary(tree: resources_pb2.Generation) -> None:
    name = enums_pb2.GenerationStatus.Name(tree.status).removeprefix("GENERATION_STATUS_")
    print(f"{tree.id} {name}")
    for prediction in tree.predictions:
        if prediction.HasField("error"):
            print(f"  prediction {prediction.index}: {prediction.error.message}")
        elif prediction.artifact.sha256:
            print(f"  prediction {prediction.index}: artifact:{prediction.artifact.sha256}")
        if prediction.HasField("agentic"):
            _print_attempts(prediction.agentic)


def _print_attempts(shot: resources_pb2.OrchestratedShot) -> None:
    """One line per attempt, then which one was accepted and why attempting stopped."""
    for attempt in shot.attempts:
        status = enums_pb2.AttemptStatus.Name(attempt.status).removeprefix("ATTEMPT_STATUS_")
        if attempt.HasField("evaluation"):
            outcome = f"score {attempt.evaluation.score:.2f} ({attempt.evaluation.feedback})"
        else:
            outcome = attempt.error.message or status.lower()
        print(f"    attempt {attempt.number}: {outcome}")
        if attempt.adjustment_reason:
            print(f"      why: {attempt.adjustment_reason}")
    reason = enums_pb2.StopReason.Name(shot.stop_reason).removeprefix("STOP_REASON_")
    if shot.best_attempt:
        print(f"    accepted attempt {shot.best_attempt} ({reason.lower()})")
