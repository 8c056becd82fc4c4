"""Stream items to messages: events (encoded once, shared by every watcher) and heartbeats."""

from __future__ import annotations

from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from sartiq_grpc.sartiq.generation.v1 import resources_pb2
from server.contract.encode import event, timestamp
from server.domain.events import GenerationEvent
from server.orchestration.watch import Heartbeat


def encoded(item: GenerationEvent) -> resources_pb2.GenerationEvent:
    """The event's contract message, made once (stored events arrive with it made)."""
    if not isinstance(item.encoded, resources_pb2.GenerationEvent):
        item.encoded = event(item)
    return item.encoded


def _wire_event(item: GenerationEvent) -> resources_pb2.GenerationEvent:
    message = resources_pb2.GenerationEvent()
    message.CopyFrom(encoded(item))
    message.cursor = item.cursor
    return message


def watch_item(item: GenerationEvent | Heartbeat) -> pb.WatchGenerationResponse:
    """One message of a WatchGeneration stream."""
    if isinstance(item, Heartbeat):
        return pb.WatchGenerationResponse(heartbeat=pb.Heartbeat(send_time=timestamp(item.time)))
    wire = item.wire
    if not isinstance(wire, pb.WatchGenerationResponse):
        wire = item.wire = pb.WatchGenerationResponse(event=_wire_event(item))
    return wire


def watch_many_item(item: GenerationEvent | Heartbeat) -> pb.WatchGenerationsResponse:
    """One message of a WatchGenerations stream."""
    if isinstance(item, Heartbeat):
        beat = pb.Heartbeat(send_time=timestamp(item.time), cursor=item.cursor)
        return pb.WatchGenerationsResponse(heartbeat=beat)
    return pb.WatchGenerationsResponse(event=watch_item(item).event)
