"""ListGenerations paging and filters; request_id idempotency."""

from __future__ import annotations

import grpc
import pytest
from helpers import GenerationStub, field_violations, wait_terminal

from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2, resources_pb2


def req(product_id: str, **extra: object) -> generation_service_pb2.CreateGenerateGenerationRequest:
    request = generation_service_pb2.CreateGenerateGenerationRequest(
        params=resources_pb2.GenerateParams(
            product_id=product_id, shot_type_string="front", width=64, height=64
        )
    )
    for key, value in extra.items():
        if key == "labels":
            request.labels.update(value)  # type: ignore[call-overload]
        else:
            setattr(request, key, value)
    return request


async def list_all(
    stub: GenerationStub, page_size: int, flt: generation_service_pb2.GenerationFilter | None = None
) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page = await stub.ListGenerations(
            generation_service_pb2.ListGenerationsRequest(
                page_size=page_size, page_token=token, filter=flt
            )
        )
        ids.extend(g.id for g in page.generations)
        token = page.next_page_token
        if not token:
            return ids


async def test_pages_cover_everything_newest_first(stub: GenerationStub, product_id: str) -> None:
    created = [
        (await stub.CreateGenerateGeneration(req(product_id))).generation.id for _ in range(7)
    ]
    assert await list_all(stub, 3) == list(reversed(created))
    assert await list_all(stub, 0) == list(reversed(created))


async def test_filters_by_label_status_and_strategy(stub: GenerationStub, product_id: str) -> None:
    tagged = (
        await stub.CreateGenerateGeneration(req(product_id, labels={"team": "a"}))
    ).generation.id
    await stub.CreateGenerateGeneration(req(product_id, labels={"team": "b"}))
    await wait_terminal(stub, tagged)
    by_label = generation_service_pb2.GenerationFilter(labels={"team": "a"})
    assert await list_all(stub, 10, by_label) == [tagged]
    completed = generation_service_pb2.GenerationFilter(
        statuses=[enums_pb2.GENERATION_STATUS_COMPLETED],
        strategies=[enums_pb2.STRATEGY_GENERATE],
        labels={"team": "a"},
    )
    assert await list_all(stub, 10, completed) == [tagged]
    failed = generation_service_pb2.GenerationFilter(statuses=[enums_pb2.GENERATION_STATUS_FAILED])
    assert await list_all(stub, 10, failed) == []


async def test_bad_page_arguments(stub: GenerationStub, product_id: str) -> None:
    for _ in range(3):
        await stub.CreateGenerateGeneration(req(product_id))
    page = await stub.ListGenerations(generation_service_pb2.ListGenerationsRequest(page_size=1))
    other_filter = generation_service_pb2.GenerationFilter(labels={"x": "y"})
    cases = [
        generation_service_pb2.ListGenerationsRequest(page_size=101),
        generation_service_pb2.ListGenerationsRequest(page_token="garbage!"),
        generation_service_pb2.ListGenerationsRequest(
            page_token=page.next_page_token, filter=other_filter
        ),
        generation_service_pb2.ListGenerationsRequest(
            filter=generation_service_pb2.GenerationFilter(
                statuses=[enums_pb2.GENERATION_STATUS_UNSPECIFIED]
            )
        ),
    ]
    expected = ["page_size", "page_token", "page_token", "filter.statuses[0]"]
    for request, field in zip(cases, expected, strict=True):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListGenerations(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in field_violations(caught.value)


async def test_same_request_id_same_request_returns_the_same_generation(
    stub: GenerationStub, product_id: str
) -> None:
    first = await stub.CreateGenerateGeneration(req(product_id, request_id="order-1"))
    second = await stub.CreateGenerateGeneration(req(product_id, request_id="order-1"))
    assert first.generation.id == second.generation.id
    assert len(await list_all(stub, 10)) == 1


async def test_same_request_id_different_request_is_already_exists(
    stub: GenerationStub, product_id: str
) -> None:
    await stub.CreateGenerateGeneration(req(product_id, request_id="order-2"))
    different = req(product_id, request_id="order-2")
    different.params.width = 128
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateGenerateGeneration(different)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(await list_all(stub, 10)) == 1


async def test_one_invalid_argument_names_every_bad_field_of_a_list(
    stub: GenerationStub, product_id: str
) -> None:
    for _ in range(2):
        await stub.CreateGenerateGeneration(req(product_id))
    page = await stub.ListGenerations(generation_service_pb2.ListGenerationsRequest(page_size=1))
    bad_filter = generation_service_pb2.GenerationFilter(
        statuses=[
            enums_pb2.GENERATION_STATUS_UNSPECIFIED,
            enums_pb2.GenerationStatus.ValueType(999),
        ],
        strategies=[enums_pb2.STRATEGY_GENERATE],
        labels={"Bad Key": "x"},
    )
    bad_filter.create_time_after.seconds = 10**12
    request = generation_service_pb2.ListGenerationsRequest(
        filter=bad_filter, page_size=101, page_token="garbage!"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListGenerations(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = set(field_violations(caught.value))
    assert {
        "filter.statuses[0]",
        "filter.statuses[1]",
        "filter.create_time_after",
        "page_size",
        "page_token",
    } <= fields
    assert any(f.startswith("filter.labels") for f in fields), fields
    # A token this service issued is not judged against a filter that is itself invalid:
    # only the filter and the page size are wrong here.
    request.page_token = page.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListGenerations(request)
    assert "page_token" not in field_violations(caught.value)
    assert "page_size" in field_violations(caught.value)


async def test_one_invalid_argument_names_every_bad_field_of_a_watch(
    stub: GenerationStub,
) -> None:
    flt = generation_service_pb2.GenerationFilter(
        types=[enums_pb2.GENERATION_TYPE_UNSPECIFIED], labels={"Bad Key": "x"}
    )
    call = stub.WatchGenerations(
        generation_service_pb2.WatchGenerationsRequest(filter=flt, after_cursor=-5)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = set(field_violations(caught.value))
    assert {"after_cursor", "filter.types[0]"} <= fields
    assert any(f.startswith("filter.labels") for f in fields), fields
