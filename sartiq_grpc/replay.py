"""Rebuild a generation from its event log, as the ``GenerationEvent`` contract describes.

    tree = None
    async for event in client.watch(generation_id):
        tree = replay.apply(tree, event)
    # tree now equals GetGeneration's answer, field by field

Each event carries the changed resource; the fold replaces the resource with the same id
(adding it when new) and keeps what events leave out: children, creation-time inputs, and
a task's ``parameters`` when the event leaves that field unset (presence, not emptiness,
says whether they changed).
"""

from __future__ import annotations

from sartiq_grpc.sartiq.generation.v1 import enums_pb2, resources_pb2

# Creation-time inputs change events do not repeat.
_GENERATION_INPUTS = (
    "params",
    "refinement",
    "labels",
    "orchestration",
    "request_id",
    "organization",
)


def apply(
    tree: resources_pb2.Generation | None, event: resources_pb2.GenerationEvent
) -> resources_pb2.Generation:
    """Return ``tree`` with ``event`` applied (a new tree for the creation event).

    Raises:
        ValueError: the first event applied is not EVENT_KIND_GENERATION_CREATED.
    """
    if event.kind == enums_pb2.EVENT_KIND_GENERATION_CREATED:
        tree = resources_pb2.Generation()
        tree.CopyFrom(event.generation)
    elif tree is None:
        raise ValueError("replay must start from the GENERATION_CREATED event (sequence 1)")
    else:
        _apply_change(tree, event)
    tree.last_event_sequence = event.sequence
    tree.prediction_counts.CopyFrom(event.prediction_counts)
    return tree


def _apply_change(tree: resources_pb2.Generation, event: resources_pb2.GenerationEvent) -> None:
    payload = event.WhichOneof("payload")
    if payload == "generation":
        _replace_generation(tree, event.generation)
    elif payload == "prediction":
        _replace_prediction(tree, event.prediction)
    elif payload == "task":
        _replace_task(tree, event.task)
    elif payload == "attempt":
        _replace_attempt(tree, event.attempt)


def _replace_generation(tree: resources_pb2.Generation, change: resources_pb2.Generation) -> None:
    kept = resources_pb2.Generation()
    kept.CopyFrom(tree)
    tree.CopyFrom(change)
    del tree.predictions[:]
    tree.predictions.extend(kept.predictions)
    for name in _GENERATION_INPUTS:
        if name == "params":
            which = kept.WhichOneof("params")
            if which is not None:
                getattr(tree, which).CopyFrom(getattr(kept, which))
        elif name == "labels":
            tree.labels.clear()
            tree.labels.update(kept.labels)
        elif name == "orchestration":
            tree.orchestration.CopyFrom(kept.orchestration)
        elif name == "refinement":
            tree.ClearField("refinement")
            if kept.HasField("refinement"):
                tree.refinement.CopyFrom(kept.refinement)
        else:
            setattr(tree, name, getattr(kept, name))


def _find_prediction(
    tree: resources_pb2.Generation, prediction_id: str
) -> resources_pb2.Prediction | None:
    return next((p for p in tree.predictions if p.id == prediction_id), None)


def _replace_prediction(tree: resources_pb2.Generation, change: resources_pb2.Prediction) -> None:
    current = _find_prediction(tree, change.id)
    if current is None:
        tree.predictions.add().CopyFrom(change)
        return
    tasks = list(current.tasks)
    attempts = list(current.agentic.attempts)
    current.CopyFrom(change)
    current.tasks.extend(tasks)
    if current.HasField("agentic"):
        current.agentic.attempts.extend(attempts)


def _replace_task(tree: resources_pb2.Generation, change: resources_pb2.ComputeTask) -> None:
    prediction = _find_prediction(tree, change.prediction_id)
    if prediction is None:
        return  # a task always follows its prediction's creation; nothing to attach to
    for task in prediction.tasks:
        if task.id == change.id:
            kept = resources_pb2.ComputeTask()
            kept.CopyFrom(task)
            task.CopyFrom(change)
            # By presence, as the contract says: unset means unchanged, and only that.
            if not change.HasField("parameters") and kept.HasField("parameters"):
                task.parameters.CopyFrom(kept.parameters)
            return
    prediction.tasks.add().CopyFrom(change)


def _replace_attempt(tree: resources_pb2.Generation, change: resources_pb2.Attempt) -> None:
    prediction = _find_prediction(tree, change.prediction_id)
    if prediction is None:
        return
    for attempt in prediction.agentic.attempts:
        if attempt.id == change.id:
            attempt.CopyFrom(change)
            return
    prediction.agentic.attempts.add().CopyFrom(change)
