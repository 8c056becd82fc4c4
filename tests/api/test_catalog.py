"""CatalogService: create, get, list, delete, with real image bytes and precise errors."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable

import grpc
import pytest
from helpers import CatalogStub, error_info, field_violations, png_bytes

from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2 as pb
from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2, artifact_service_pb2_grpc

PNG = png_bytes((120, 30, 60), size=(16, 16))


async def test_create_get_list_delete_subject(catalog: CatalogStub) -> None:
    data = png_bytes((10, 200, 10), size=(40, 60))
    created = (
        await catalog.CreateSubject(
            pb.CreateSubjectRequest(
                name=" Ana ",
                description="model",
                reference_images=[pb.ImageInput(data=data)],
                lora=pb.Lora(uri="s3://loras/ana.safetensors", default_weight=1.2),
            )
        )
    ).subject
    assert created.name == "Ana"
    ref = created.reference_images[0]
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert (ref.width, ref.height, ref.mime_type) == (40, 60, "image/png")
    assert created.lora.default_weight == pytest.approx(1.2)

    got = (await catalog.GetSubject(pb.GetSubjectRequest(subject_id=created.id))).subject
    assert got == created

    reused = await catalog.CreateSubject(
        pb.CreateSubjectRequest(
            name="Ana 2", reference_images=[pb.ImageInput(artifact=f"artifact:{ref.sha256}")]
        )
    )
    assert reused.subject.reference_images[0].sha256 == ref.sha256

    listed = await catalog.ListSubjects(pb.ListSubjectsRequest(page_size=1))
    assert [s.id for s in listed.subjects] == [reused.subject.id]
    rest = await catalog.ListSubjects(pb.ListSubjectsRequest(page_token=listed.next_page_token))
    assert [s.id for s in rest.subjects] == [created.id]
    assert rest.next_page_token == ""

    await catalog.DeleteSubject(pb.DeleteSubjectRequest(subject_id=created.id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await catalog.GetSubject(pb.GetSubjectRequest(subject_id=created.id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_kinds_are_separate(catalog: CatalogStub, product_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await catalog.GetStyle(pb.GetStyleRequest(style_id=product_id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    products = await catalog.ListProducts(pb.ListProductsRequest())
    assert [p.id for p in products.products] == [product_id]
    assert list((await catalog.ListStyles(pb.ListStylesRequest())).styles) == []


async def test_bad_create_names_every_field(catalog: CatalogStub) -> None:
    request = pb.CreateStyleRequest(
        name="",
        description="x" * 2001,
        reference_images=[
            pb.ImageInput(data=b"not an image"),
            pb.ImageInput(artifact="https://example.invalid/a.png"),
            pb.ImageInput(data=png_bytes((1, 2, 3))),
        ],
        lora=pb.Lora(default_weight=3),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await catalog.CreateStyle(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {
        "name",
        "description",
        "reference_images[0].data",
        "reference_images[1].artifact",
        "lora.uri",
        "lora.default_weight",
    }
    assert list((await catalog.ListStyles(pb.ListStylesRequest())).styles) == []


async def test_decompression_bomb_is_refused(catalog: CatalogStub) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")  # 100 MP, tiny file
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await catalog.CreateProduct(
            pb.CreateProductRequest(
                name="bomb", reference_images=[pb.ImageInput(data=buffer.getvalue())]
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pixels" in field_violations(caught.value)["reference_images[0].data"]


async def test_unknown_ids(catalog: CatalogStub) -> None:
    missing = str(uuid.uuid4())
    calls: list[Awaitable[object]] = [
        catalog.GetProduct(pb.GetProductRequest(product_id=missing)),
        catalog.DeleteStyle(pb.DeleteStyleRequest(style_id=missing)),
        catalog.CreateProduct(
            pb.CreateProductRequest(
                name="p", reference_images=[pb.ImageInput(artifact=f"artifact:{'0' * 64}")]
            )
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_same_image_twice_is_stored_once(catalog: CatalogStub) -> None:
    data = png_bytes((7, 70, 140))
    first = await catalog.CreateProduct(
        pb.CreateProductRequest(name="a", reference_images=[pb.ImageInput(data=data)])
    )
    second = await catalog.CreateStyle(
        pb.CreateStyleRequest(name="b", reference_images=[pb.ImageInput(data=data)] * 2)
    )
    shas = {ref.sha256 for ref in second.style.reference_images}
    assert shas == {first.product.reference_images[0].sha256}
    assert len(second.style.reference_images) == 2


async def test_lora_weights_come_from_an_allowed_prefix_or_an_own_upload(
    catalog: CatalogStub, channel: grpc.aio.Channel
) -> None:
    allowed = await catalog.CreateSubject(
        pb.CreateSubjectRequest(name="A", lora=pb.Lora(uri="s3://loras/a.safetensors"))
    )
    assert allowed.subject.lora.uri == "s3://loras/a.safetensors"
    for uri in ("https://evil.example/x.safetensors", "file:///etc/passwd", "s3://other/x"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await catalog.CreateSubject(pb.CreateSubjectRequest(name="B", lora=pb.Lora(uri=uri)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "allowed prefix (s3://loras/)" in field_violations(caught.value)["lora.uri"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await catalog.CreateSubject(
            pb.CreateSubjectRequest(name="C", lora=pb.Lora(uri="artifact:" + "c" * 64))
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    upload = artifact_service_pb2_grpc.ArtifactServiceStub(channel).UploadArtifact(
        iter(
            [
                artifact_service_pb2.UploadArtifactRequest(
                    header=artifact_service_pb2.UploadArtifactHeader(size_bytes=len(PNG))
                ),
                artifact_service_pb2.UploadArtifactRequest(chunk=PNG),
            ]
        )
    )
    sha = (await upload).artifact.sha256
    own = await catalog.CreateSubject(
        pb.CreateSubjectRequest(name="D", lora=pb.Lora(uri=f"artifact:{sha}"))
    )
    assert own.subject.lora.uri == f"artifact:{sha}"


async def test_every_unknown_artifact_of_a_create_is_named(catalog: CatalogStub) -> None:
    unknown = [f"artifact:{digit * 64}" for digit in "de"]
    request = pb.CreateProductRequest(
        name="Dress",
        reference_images=[
            pb.ImageInput(data=PNG),
            pb.ImageInput(artifact=unknown[0]),
            pb.ImageInput(artifact=unknown[1]),
        ],
        lora=pb.Lora(uri="artifact:" + "f" * 64),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await catalog.CreateProduct(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # One ErrorInfo.metadata entry per unknown id, as the contract promises.
    assert dict(error_info(caught.value).metadata) == {
        "reference_images[1].artifact": unknown[0][:64] + "...",
        "reference_images[2].artifact": unknown[1][:64] + "...",
        "lora.uri": ("artifact:" + "f" * 64)[:64] + "...",
    }
    assert list((await catalog.ListProducts(pb.ListProductsRequest())).products) == []
