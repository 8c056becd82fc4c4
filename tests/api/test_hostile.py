"""One regression test per class of hostile input that once broke the server.

Each was found by attacking a running server; each must now be a precise error: never
UNKNOWN or INTERNAL, never an error the client cannot receive, never a stalled loop.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import grpc
import pytest
from helpers import (
    CatalogStub,
    GenerationStub,
    field_violations,
    generate_request,
    rich_status,
)
from PIL import Image

from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2
from server.domain.paging import PageTokens

pb = generation_service_pb2
IDENTITY: dict[str, Any] = {
    "request_serializer": lambda b: b,
    "response_deserializer": lambda b: b,
}


async def _raised(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xfe\xfd\xfc", b"\x0a\x03\xff\xfe\xfd", b"\x0a\xff\xff\xff\xff\x0f"],
    ids=["random bytes", "invalid UTF-8 in a string", "a length past the end"],
)
async def test_undecodable_requests_are_invalid_argument(
    channel: grpc.aio.Channel, payload: bytes
) -> None:
    unary = channel.unary_unary("/sartiq.generation.v1.GenerationService/GetGeneration", **IDENTITY)
    error = await _raised(unary(payload))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == {"request"}
    stream = channel.unary_stream(
        "/sartiq.generation.v1.GenerationService/WatchGeneration", **IDENTITY
    )
    error = await _raised(stream(payload).read())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    upload = channel.stream_unary(
        "/sartiq.generation.v1.ArtifactService/UploadArtifact", **IDENTITY
    )
    error = await _raised(upload(iter([payload])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == {"request"}


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(10**12, 0), (5, -5), (-5, 5), (1, 10**9)],
    ids=["past datetime", "mixed sign", "mixed sign, negative", "nanos overflow"],
)
async def test_malformed_durations_are_named(
    stub: GenerationStub, product_id: str, seconds: int, nanos: int
) -> None:
    request = generate_request(product_id)
    request.timeout.seconds, request.timeout.nanos = seconds, nanos
    error = await _raised(stub.CreateGenerateGeneration(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timeout" in field_violations(error)


async def test_timestamps_out_of_range_are_named(stub: GenerationStub) -> None:
    flt = pb.GenerationFilter()
    flt.create_time_after.seconds = 2**62
    flt.create_time_before.nanos = -1
    error = await _raised(stub.ListGenerations(pb.ListGenerationsRequest(filter=flt)))
    assert set(field_violations(error)) == {
        "filter.create_time_after",
        "filter.create_time_before",
    }


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.mark.parametrize(
    "token",
    [
        _b64(b"[" * 50_000 + b"]" * 50_000),
        _b64(json.dumps({"t": "99999-01-01", "id": "x", "k": "y"}).encode()),
        _b64(b'{"t":"2026-01-01T00:00:00+00:00","id":"x","k":"y"}') + "." + _b64(b"0" * 32),
        "a" * 100_000,
        "é.é",
    ],
    ids=["deep nesting", "impossible date", "forged signature", "huge", "not ASCII"],
)
async def test_crafted_page_tokens_are_refused_unread(stub: GenerationStub, token: str) -> None:
    error = await _raised(stub.ListGenerations(pb.ListGenerationsRequest(page_token=token)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error) == {"page_token": "is not a token this service issued"}


def test_a_token_signed_with_another_secret_is_not_ours() -> None:
    from datetime import UTC, datetime

    from server.domain.errors import Violations
    from server.domain.paging import Cursor

    ours, theirs = PageTokens(b"k" * 32), PageTokens(b"x" * 32)
    token = theirs.encode(Cursor(datetime(2026, 1, 1, tzinfo=UTC), "id"), "key")
    v = Violations()
    assert ours.decode(token, "key", v) is None
    assert [i.field for i in v.items] == ["page_token"]
    assert theirs.decode(token, "key", Violations()) == Cursor(
        datetime(2026, 1, 1, tzinfo=UTC), "id"
    )


async def test_a_label_flood_in_a_filter_is_refused_at_once(stub: GenerationStub) -> None:
    flt = pb.GenerationFilter()
    for i in range(5000):
        flt.labels[f"k{i}"] = "v"
    error = await _raised(stub.ListGenerations(pb.ListGenerationsRequest(filter=flt)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Refused by the request's bounds, before any query is built (no timing check: how
    # long it takes on a loaded machine proves nothing).
    assert list(field_violations(error)) == ["filter.labels"]


async def test_huge_echoes_are_cut_so_the_error_arrives(
    stub: GenerationStub, product_id: str
) -> None:
    error = await _raised(stub.GetGeneration(pb.GetGenerationRequest(generation_id="a" * 5000)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert len(rich_status(error).SerializeToString()) < 1024
    request = generate_request(product_id)
    request.labels["k" * (1 << 20)] = "v" * (1 << 16)
    error = await _raised(stub.CreateGenerateGeneration(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    (path,) = field_violations(error)
    assert path.startswith('labels["kkkk')
    assert len(path) < 100
    flt = pb.GenerationFilter()
    flt.statuses.extend([enums_pb2.GenerationStatus.ValueType(99)] * 1000)
    error = await _raised(stub.ListGenerations(pb.ListGenerationsRequest(filter=flt)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(rich_status(error).SerializeToString()) < 2048


async def test_many_violations_still_fit_the_metadata_limit(
    stub: GenerationStub, product_id: str
) -> None:
    request = generate_request(product_id)
    for i in range(32):
        request.labels[f"Bad\n{i}" + "x" * 300] = "v" * 300
    error = await _raised(stub.CreateGenerateGeneration(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(rich_status(error).SerializeToString()) < 6 * 1024
    shown = list(field_violations(error).values())
    assert shown[-1].endswith("more not shown)")


@pytest.mark.parametrize(
    ("field", "value"),
    [("request_id", "abc\n"), ("labels", "abc\n"), ("product_id", "x\n")],
)
async def test_a_trailing_newline_does_not_pass_a_pattern(
    stub: GenerationStub, product_id: str, field: str, value: str
) -> None:
    request = generate_request(product_id)
    if field == "request_id":
        request.request_id = value
    elif field == "labels":
        request.labels[value] = "v"
    else:
        request.params.product_id = value
    error = await _raised(stub.CreateGenerateGeneration(request))
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    if field != "product_id":
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_unknown_enum_is_reported_with_the_other_violations(
    stub: GenerationStub, product_id: str
) -> None:
    request = generate_request(product_id)
    request.orchestration.type = enums_pb2.GenerationType.ValueType(77)
    request.params.width = 3
    request.params.batch_size = 99
    error = await _raised(stub.CreateGenerateGeneration(request))
    assert set(field_violations(error)) == {
        "orchestration.type",
        "params.width",
        "params.batch_size",
    }


def _encoded(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["DDS", "SPIDER", "TIFF", "BMP", "GIF", "ICO"])
async def test_images_in_other_formats_are_invalid_argument(catalog: CatalogStub, fmt: str) -> None:
    request = catalog_service_pb2.CreateProductRequest(
        name="x", reference_images=[catalog_service_pb2.ImageInput(data=_encoded(fmt))]
    )
    error = await _raised(catalog.CreateProduct(request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "PNG, JPEG or WebP" in next(iter(field_violations(error).values()))
