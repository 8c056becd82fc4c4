"""Bad requests get precise errors naming every offending field, and change nothing."""

from __future__ import annotations

import uuid

import grpc
import pytest
from google.protobuf import duration_pb2
from helpers import GenerationStub, error_info, field_violations, png_bytes, wait_submitted

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, generation_service_pb2, resources_pb2
from server.app import App
from server.compute.fake import FakeComputeBackend


async def create_error(
    stub: GenerationStub, req: generation_service_pb2.CreateGenerateGenerationRequest
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateGenerateGeneration(req)
    return caught.value


async def assert_nothing_stored(stub: GenerationStub, compute: FakeComputeBackend) -> None:
    listed = await stub.ListGenerations(generation_service_pb2.ListGenerationsRequest())
    assert list(listed.generations) == []
    assert compute.submitted == []


def gen(**params: object) -> generation_service_pb2.CreateGenerateGenerationRequest:
    return generation_service_pb2.CreateGenerateGenerationRequest(
        params=resources_pb2.GenerateParams(**params)  # type: ignore[arg-type]
    )


async def test_missing_shot_type_and_entities(
    stub: GenerationStub, fake_compute: FakeComputeBackend
) -> None:
    error = await create_error(stub, gen())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = field_violations(error)
    assert set(fields) == {"params.shot_type_string", "params.subject_id", "params.product_id"}
    assert error_info(error).reason == "INVALID_ARGUMENT"
    await assert_nothing_stored(stub, fake_compute)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"width": 32, "height": 5000}, {"params.width", "params.height"}),
        ({"width": 100}, {"params.width"}),
        ({"batch_size": 17}, {"params.batch_size"}),
        ({"batch_size": -1}, {"params.batch_size"}),
        ({"steps": 151}, {"params.steps"}),
        ({"seed": -5}, {"params.seed"}),
        ({"style_lora_weight": 1.0}, {"params.style_lora_weight"}),
        ({"product_lora_weight": 2.5}, {"params.product_lora_weight"}),
        (
            {"auto_generate_prompt": True, "generated_prompt": "x"},
            {"params.auto_generate_prompt", "params.generated_prompt"},
        ),
        ({"generated_prompt": "x" * 4001}, {"params.generated_prompt"}),
    ],
)
async def test_out_of_range_fields_are_named(
    stub: GenerationStub,
    fake_compute: FakeComputeBackend,
    params: dict[str, object],
    expected: set[str],
) -> None:
    base: dict[str, object] = {"product_id": str(uuid.uuid4()), "shot_type_string": "front"}
    error = await create_error(stub, gen(**{**base, **params}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == expected
    await assert_nothing_stored(stub, fake_compute)


async def test_option_violations_are_reported_with_param_violations(
    stub: GenerationStub, fake_compute: FakeComputeBackend
) -> None:
    req = gen(shot_type_string="front")
    req.request_id = "bad id with spaces"
    req.labels["Bad Key"] = "v"
    req.timeout.CopyFrom(duration_pb2.Duration(seconds=0))
    req.orchestration.agentic.max_attempts = 3
    error = await create_error(stub, req)
    assert set(field_violations(error)) == {
        "request_id",
        'labels["Bad Key"]',
        "timeout",
        "orchestration.agentic",
        "params.subject_id",
        "params.product_id",
    }
    await assert_nothing_stored(stub, fake_compute)


async def test_unknown_catalog_ids_are_not_found(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    missing = str(uuid.uuid4())
    error = await create_error(
        stub, gen(subject_id=missing, product_id=product_id, shot_type_string="front")
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "params.subject_id" in (error.details() or "")
    assert dict(error_info(error).metadata) == {"params.subject_id": missing}
    await assert_nothing_stored(stub, fake_compute)


async def test_malformed_id_is_not_found(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    error = await create_error(
        stub, gen(product_id=product_id, style_id="not-an-id", shot_type_string="front")
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert dict(error_info(error).metadata) == {"params.style_id": "not-an-id"}
    await assert_nothing_stored(stub, fake_compute)


async def test_product_id_of_a_subject_is_not_found(
    stub: GenerationStub, fake_compute: FakeComputeBackend, subject_id: str
) -> None:
    error = await create_error(stub, gen(product_id=subject_id, shot_type_string="front"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert dict(error_info(error).metadata) == {"params.product_id": subject_id}
    await assert_nothing_stored(stub, fake_compute)


async def test_agentic_validate_only_previews_the_first_attempt(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    req = gen(product_id=product_id, shot_type_string="front")
    req.orchestration.type = enums_pb2.GENERATION_TYPE_AGENTIC
    req.validate_only = True
    preview = (await stub.CreateGenerateGeneration(req)).generation
    shot = preview.predictions[0].agentic
    assert (shot.config.max_attempts, shot.config.min_confidence_score) == (3, 0.7)
    assert shot.config.evaluation_provider == "auto"
    assert [a.number for a in shot.attempts] == [1]
    assert shot.attempts[0].status == enums_pb2.ATTEMPT_STATUS_PENDING
    await assert_nothing_stored(stub, fake_compute)


async def test_validate_only_creates_nothing(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    req = gen(product_id=product_id, shot_type_string="front", batch_size=2)
    req.validate_only = True
    response = await stub.CreateGenerateGeneration(req)
    assert response.generation.id == ""
    assert response.generation.status == enums_pb2.GENERATION_STATUS_PENDING
    assert len(response.generation.predictions) == 2
    await assert_nothing_stored(stub, fake_compute)


async def test_unknown_generation_is_not_found(stub: GenerationStub) -> None:
    for call in (
        stub.GetGeneration(generation_service_pb2.GetGenerationRequest(generation_id="nope")),
        stub.CancelGeneration(generation_service_pb2.CancelGenerationRequest(generation_id="nope")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_unknown_orchestration_type_is_invalid(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    req = gen(product_id=product_id, shot_type_string="front")
    req.orchestration.type = 99  # type: ignore[assignment]
    error = await create_error(stub, req)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == {"orchestration.type"}
    await assert_nothing_stored(stub, fake_compute)


async def test_every_unknown_catalog_id_is_named(
    stub: GenerationStub, fake_compute: FakeComputeBackend
) -> None:
    error = await create_error(
        stub,
        gen(subject_id="gone-1", product_id="gone-2", style_id="gone-3", shot_type_string="x"),
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    # One metadata entry per unknown id, not a joined string.
    assert dict(error_info(error).metadata) == {
        "params.subject_id": "gone-1",
        "params.product_id": "gone-2",
        "params.style_id": "gone-3",
    }
    await assert_nothing_stored(stub, fake_compute)


# -- EDITING: what each tool requires, and every unknown input named at once -----------

EDIT = enums_pb2.EDITING_TOOL_EDIT
SWAP = enums_pb2.EDITING_TOOL_SUBJECT_SWAP
ENHANCE = enums_pb2.EDITING_TOOL_PRODUCT_ENHANCEMENT
UNKNOWN_PREDICTION = f"prediction:{uuid.UUID(int=1)}"


def edit(**params: object) -> generation_service_pb2.CreateEditingGenerationRequest:
    params.setdefault("base_img_path", UNKNOWN_PREDICTION)
    return generation_service_pb2.CreateEditingGenerationRequest(
        params=resources_pb2.EditingParams(**params)  # type: ignore[arg-type]
    )


async def edit_error(
    stub: GenerationStub, req: generation_service_pb2.CreateEditingGenerationRequest
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateEditingGeneration(req)
    return caught.value


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"tool": EDIT}, {"params.reference_images", "params.prompt"}),
        ({"tool": EDIT, "prompt": " \n "}, {"params.reference_images", "params.prompt"}),
        ({"tool": SWAP, "product_id": "p"}, {"params.subject_id"}),
        ({"tool": ENHANCE}, {"params.product_id"}),
        ({"tool": ENHANCE, "subject_id": "s", "prompt": "x"}, {"params.product_id"}),
    ],
    ids=["edit-bare", "edit-blank-prompt", "swap", "enhance", "enhance-with-others"],
)
async def test_each_editing_tool_names_what_it_lacks(
    stub: GenerationStub,
    fake_compute: FakeComputeBackend,
    params: dict[str, object],
    expected: set[str],
) -> None:
    error = await edit_error(stub, edit(**params))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == expected
    await assert_nothing_stored(stub, fake_compute)


async def test_an_edit_with_a_prompt_alone_is_accepted(
    app: App, stub: GenerationStub, fake_compute: FakeComputeBackend
) -> None:
    async with SartiqClient(f"127.0.0.1:{app.port}") as client:
        base = f"artifact:{(await client.upload(png_bytes((20, 90, 200)))).sha256}"
    created = await stub.CreateEditingGeneration(
        edit(base_img_path=base, tool=EDIT, prompt="warmer and brighter")
    )
    task = created.generation.predictions[0].tasks[0]
    assert task.parameters.fields["prompt"].string_value == "warmer and brighter"
    assert list(task.parameters.fields["reference_images"].list_value.values) == []
    await wait_submitted(fake_compute, 1)


async def test_every_unknown_editing_input_is_named(
    stub: GenerationStub, fake_compute: FakeComputeBackend
) -> None:
    # The case: SUBJECT_SWAP with an unknown base image and an unknown subject.
    error = await edit_error(stub, edit(tool=SWAP, subject_id="gone-subject"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert dict(error_info(error).metadata) == {
        "params.base_img_path": UNKNOWN_PREDICTION,
        "params.subject_id": "gone-subject",
    }
    unknown_artifact = "artifact:" + "0" * 64
    error = await edit_error(
        stub,
        edit(
            tool=SWAP,
            reference_images=[unknown_artifact],
            subject_id="gone-subject",
            product_id="gone-product",
        ),
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(error)
    assert dict(info.metadata) == {
        "params.base_img_path": UNKNOWN_PREDICTION,
        "params.reference_images[0]": unknown_artifact[:64] + "...",
        "params.subject_id": "gone-subject",
        "params.product_id": "gone-product",
    }
    assert info.reason == "NOT_FOUND"
    await assert_nothing_stored(stub, fake_compute)


async def test_an_unknown_id_wins_over_an_input_that_is_not_ready(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True  # the first generation's prediction stays unfinished
    created = await stub.CreateGenerateGeneration(gen(product_id=product_id, shot_type_string="x"))
    unready = f"prediction:{created.generation.predictions[0].id}"
    error = await edit_error(stub, edit(base_img_path=unready, tool=SWAP, subject_id="gone"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert dict(error_info(error).metadata) == {"params.subject_id": "gone"}
    # With every id known, the unfinished input is what is wrong.
    error = await edit_error(stub, edit(base_img_path=unready, tool=ENHANCE, product_id=product_id))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert dict(error_info(error).metadata) == {"field": "params.base_img_path"}
