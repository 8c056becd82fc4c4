"""Hostile input against a real server through a real channel (Hypothesis).

Every method of every service gets structured messages full of hostile values (huge,
empty, control characters, traversal paths, private URLs, extreme numbers, unknown
enum values, malformed Durations and Timestamps, oversized maps and lists) and raw
bytes that are not messages at all. Every answer must be a proper one: never INTERNAL
or UNKNOWN, every INVALID_ARGUMENT with a decodable BadRequest naming at least one
field, the health service SERVING throughout. Afterwards: nothing stored by a rejected
request, ``PRAGMA integrity_check`` ok, and bounded memory.

``make test`` runs a short round; ``SARTIQ_FUZZ_EXAMPLES=10000`` (``make fuzz``) a long one.
"""

from __future__ import annotations

import os
import resource
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from conftest import make_settings
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import png_bytes, rich_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2
from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2, generation_service_pb2
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ServerSettings

EXAMPLES = int(os.environ.get("SARTIQ_FUZZ_EXAMPLES", "150"))
MAX_MESSAGE = 1024 * 1024
METHODS: list[MethodDescriptor] = [
    method
    for module in (generation_service_pb2, artifact_service_pb2, catalog_service_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
HOSTILE_TEXT = [
    "",
    " ",
    "\n",
    "abc\n",
    "\x00",
    "a" * 5000,
    "ñ" * 300,
    "../../etc/passwd",
    "file:///etc/passwd",
    "file:///tmp/../etc/shadow",
    "http://127.0.0.1:22/",
    "http://169.254.169.254/latest/meta-data",
    "https://[::1]/x.png",
    "artifact:" + "a" * 64,
    "artifact:" + "a" * 64 + "\n",
    "prediction:00000000-0000-0000-0000-000000000000",
    "prediction:",
    "step:0",
    "data:image/png;base64,AAAA",
    '"; DROP TABLE generations; --',
    "%s%s%s%n",
    "\u202e\ufeff",
]
TEXT = st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(max_size=40))
INT64 = st.one_of(
    st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
)
INT32 = st.one_of(
    st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1)
)
DOUBLE = st.floats(allow_nan=True, allow_infinity=True, width=64)
BYTES = st.one_of(st.binary(max_size=64), st.just(png_bytes((1, 2, 3), (8, 8))))
_SCALARS: dict[int, Any] = {
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_BYTES: BYTES,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_DOUBLE: DOUBLE,
    FieldDescriptor.TYPE_FLOAT: st.floats(allow_nan=True, allow_infinity=True, width=32),
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_SINT64: INT64,
    FieldDescriptor.TYPE_SFIXED64: INT64,
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: INT32,
    FieldDescriptor.TYPE_SINT32: INT32,
    FieldDescriptor.TYPE_SFIXED32: INT32,
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_ENUM: st.integers(-3, 40),
}


def _value(field: FieldDescriptor, depth: int) -> Any:
    if field.message_type is not None:
        return message_of(field.message_type, depth + 1)
    return _SCALARS[field.type]


@st.composite
def _fill(draw: Any, descriptor: Descriptor, depth: int) -> dict[str, Any]:
    values: dict[str, Any] = {}
    oneofs_used: set[str] = set()
    for field in descriptor.fields:
        if depth > 3 and field.type == FieldDescriptor.TYPE_MESSAGE:
            continue
        group = field.containing_oneof
        if group is not None and (group.name in oneofs_used or not draw(st.booleans())):
            continue
        if not draw(st.integers(0, 3)):  # leave a quarter of the fields unset
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            values[field.name] = draw(
                st.dictionaries(_SCALARS[key_field.type], _value(value_field, depth), max_size=40)
            )
        elif field.is_repeated:
            values[field.name] = draw(st.lists(_value(field, depth), max_size=40))
        else:
            values[field.name] = draw(_value(field, depth))
        if group is not None:
            oneofs_used.add(group.name)
    return values


def message_of(descriptor: Descriptor, depth: int = 0) -> Any:
    """A strategy for messages of ``descriptor`` filled with hostile values."""
    cls = message_factory.GetMessageClass(descriptor)

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            target = getattr(message, name)
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    if isinstance(item, Message):
                        target[key].CopyFrom(item)
                    else:
                        target[key] = item
            elif field.is_repeated:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    for item in value:
                        target.add().CopyFrom(item)
                else:
                    target.extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return _fill(descriptor, depth).map(build)


class Ledger:
    """What the fuzzing saw: answers by code, and what it must find stored afterwards."""

    def __init__(self) -> None:
        self.codes: Counter[str] = Counter()
        self.created_generations = 0
        self.created_entities = 0
        self.bad: list[str] = []
        self.calls = 0
        self.rss_start_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@dataclass
class Fuzzed:
    """The server under fuzz, shared by this module's tests."""

    app: App
    channel: grpc.aio.Channel
    database: Path
    ledger: Ledger


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fuzzed]:
    workdir = tmp_path_factory.mktemp("fuzz")
    base = make_settings(workdir)
    limited = ServerSettings(port=0, grace_period=1.0, max_message_bytes=MAX_MESSAGE)
    app = App(base.model_copy(update={"server": limited}), compute=FakeComputeBackend())
    async with app:
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{app.port}",
            options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE)],
        )
        yield Fuzzed(app, channel, workdir / "sartiq.db", Ledger())
        await channel.close(None)


def _check(error: grpc.aio.AioRpcError, method: str, ledger: Ledger) -> None:
    code = error.code()
    ledger.codes[code.name] += 1
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        ledger.bad.append(f"{method}: {code.name} {error.details()}")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "metadata" in (error.details() or ""):
        ledger.bad.append(f"{method}: an error too large to deliver: {error.details()}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        try:
            status = rich_status(error)
        except AssertionError:
            ledger.bad.append(f"{method}: INVALID_ARGUMENT without details")
            return
        bad = [d for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
        request = error_details_pb2.BadRequest()
        if not bad or not bad[0].Unpack(request) or not request.field_violations:
            ledger.bad.append(f"{method}: INVALID_ARGUMENT without a BadRequest")


async def _call(
    channel: grpc.aio.Channel, method: MethodDescriptor, payload: bytes, ledger: Ledger
) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    try:
        if method.client_streaming:
            call = channel.stream_unary(path, **identity)
            await call(iter([payload, payload]), timeout=5)
        elif method.server_streaming:
            stream = channel.unary_stream(path, **identity)(payload, timeout=0.5)
            async for _ in stream:
                break
            stream.cancel()
        else:
            await channel.unary_unary(path, **identity)(payload, timeout=5)
        ledger.codes["OK"] += 1
        if method.name.startswith("Create") and method.name.endswith("Generation"):
            ledger.created_generations += 1
        elif method.name.startswith("Create"):
            ledger.created_entities += 1
        elif method.name.startswith("Delete"):
            ledger.codes["DELETED"] += 1
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
            ledger.codes["STREAM_OPEN"] += 1  # a valid watch with nothing to say yet
            return
        _check(error, path, ledger)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=os.environ.get("SARTIQ_FUZZ_SEED") is None,
    database=None,
)
@given(data=st.data())
async def test_no_request_can_break_the_server(fuzzed: Fuzzed, data: Any) -> None:
    method = data.draw(st.sampled_from(METHODS))
    kind = data.draw(st.sampled_from(["message", "message", "message", "bytes", "huge"]))
    if kind == "bytes":
        payload = data.draw(st.binary(max_size=512))
    elif kind == "huge":
        payload = b"\x0a" + b"\xff\xff\xff\x07" + b"x" * (MAX_MESSAGE + 10)  # over the limit
    else:
        message = data.draw(message_of(method.input_type))
        payload = message.SerializeToString()
    ledger = fuzzed.ledger
    await _call(fuzzed.channel, method, payload, ledger)
    ledger.calls += 1
    if ledger.calls % 25 == 0:
        assert await _serving(fuzzed.channel)
    assert not ledger.bad, ledger.bad[-1]


async def _serving(channel: grpc.aio.Channel) -> bool:
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    return bool(health.status == health_pb2.HealthCheckResponse.SERVING)


async def test_afterwards_nothing_rejected_is_stored_and_the_server_is_sound(
    fuzzed: Fuzzed,
) -> None:
    """After the fuzzing, on the same server: its totals, its database, its memory."""
    ledger = fuzzed.ledger
    assert ledger.calls >= EXAMPLES
    assert not ledger.bad
    assert ledger.codes["INVALID_ARGUMENT"] > 0
    assert await _serving(fuzzed.channel)
    with sqlite3.connect(fuzzed.database) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        (generations,) = conn.execute("SELECT count(*) FROM generations").fetchone()
        (entities,) = conn.execute("SELECT count(*) FROM catalog_entities").fetchone()
    assert generations == ledger.created_generations  # nothing from a rejected request
    assert entities == ledger.created_entities - _deleted(ledger)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - ledger.rss_start_kib) / 1024
    print(f"fuzz: {ledger.calls} requests, {dict(ledger.codes)}, peak RSS +{grown_mib:.0f} MiB")
    assert grown_mib < 300


def _deleted(ledger: Ledger) -> int:
    return ledger.codes["DELETED"]
