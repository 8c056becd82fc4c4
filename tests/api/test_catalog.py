"""CatalogService: create, get, list, delete, with real image bytes and precise errors."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
from conftest import make_settings
from helpers import CatalogStub, error_info, field_violations, png_bytes

from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2 as pb
from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2, artifact_service_pb2_grpc
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.domain.errors import StartupError

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
    shouted = await catalog.CreateSubject(  # a scheme's case never matters
        pb.CreateSubjectRequest(
            name="Ana 3", reference_images=[pb.ImageInput(artifact=f"ARTIFACT:{ref.sha256}")]
        )
    )
    assert shouted.subject.reference_images[0].sha256 == ref.sha256

    listed = await catalog.ListSubjects(pb.ListSubjectsRequest(page_size=2))
    assert [s.id for s in listed.subjects] == [shouted.subject.id, reused.subject.id]
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


ALLOWED = "https://Allowed.Example/loras"  # normalised when read: any spelling matches it


@pytest.fixture
async def lora_catalog(tmp_path: Path) -> AsyncIterator[CatalogStub]:
    settings = make_settings(tmp_path)
    media = settings.media.model_copy(update={"lora_prefixes": (ALLOWED, "s3://loras/")})
    async with (
        App(settings.model_copy(update={"media": media}), compute=FakeComputeBackend()) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        yield CatalogStub(channel)


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("https://allowed.example/loras/../admin/x.safetensors", "allowed prefix"),
        ("HTTPS://ALLOWED.EXAMPLE/loras/../admin/x.safetensors", "allowed prefix"),
        ("https://allowed.example/loras/%2e%2e/admin/x.safetensors", "percent-encode dots"),
        ("https://allowed.example/loras/%2E%2E/admin/x.safetensors", "percent-encode dots"),
        ("https://allowed.example/loras/.%2e/admin/x.safetensors", "percent-encode dots"),
        ("https://allowed.example/loras/..%2fadmin/x.safetensors", "percent-encode dots"),
        ("https://allowed.example/loras%2f../admin/x.safetensors", "percent-encode dots"),
        ("https://allowed.example/loras/..\\admin/x.safetensors", "backslashes"),
        ("https://allowed.example/loras-evil/x.safetensors", "allowed prefix"),
        ("https://allowed.example.evil/loras/x.safetensors", "allowed prefix"),
        ("https://me:secret@allowed.example/loras/x.safetensors", "credentials"),
        ("s3://loras/%2e%2e/x.safetensors", "percent-encode dots"),
        ("s3://other/../loras/x.safetensors", "allowed prefix"),
        ("s3://loras-evil/x.safetensors", "allowed prefix"),
        ("ARTIFACT:" + "C" * 64, "artifact:<sha256 hex>"),
    ],
)
async def test_a_lora_uri_is_normalised_before_the_allow_list(
    lora_catalog: CatalogStub, uri: str, problem: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await lora_catalog.CreateSubject(pb.CreateSubjectRequest(name="A", lora=pb.Lora(uri=uri)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {"lora.uri"}
    assert problem in field_violations(caught.value)["lora.uri"]


@pytest.mark.parametrize(
    ("uri", "stored"),
    [
        (
            "HTTPS://ALLOWED.example:443/loras/./ana/%7Ev1.safetensors",
            "https://allowed.example/loras/ana/~v1.safetensors",
        ),
        ("https://allowed.example/loras", "https://allowed.example/loras"),
        ("S3://Loras/ana/../bo.safetensors", "s3://loras/bo.safetensors"),
        ("s3://loras/../bo.safetensors", "s3://loras/bo.safetensors"),  # still in the bucket
    ],
)
async def test_an_allowed_lora_uri_is_stored_normalised(
    lora_catalog: CatalogStub, uri: str, stored: str
) -> None:
    created = await lora_catalog.CreateSubject(
        pb.CreateSubjectRequest(name="A", lora=pb.Lora(uri=uri))
    )
    assert created.subject.lora.uri == stored
    got = await lora_catalog.GetSubject(pb.GetSubjectRequest(subject_id=created.subject.id))
    assert got.subject.lora.uri == stored


async def test_a_lora_prefix_that_is_not_an_absolute_uri_stops_the_start(tmp_path: Path) -> None:
    for prefix in ("loras/", "https://h/%2e%2e/loras/"):
        settings = make_settings(tmp_path)
        media = settings.media.model_copy(update={"lora_prefixes": (prefix,)})
        app = App(settings.model_copy(update={"media": media}), compute=FakeComputeBackend())
        with pytest.raises(StartupError, match="LoRA prefix"):
            async with app:
                pass


async def test_a_catalog_list_names_a_bad_page_size_and_token_at_once(
    catalog: CatalogStub,
) -> None:
    for request in (
        pb.ListSubjectsRequest(page_size=1000, page_token="garbage!"),
        pb.ListProductsRequest(page_size=-1, page_token="garbage!"),
        pb.ListStylesRequest(page_size=201, page_token="x.y"),
    ):
        method = getattr(catalog, type(request).__name__.removesuffix("Request"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await method(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(caught.value)) == {"page_size", "page_token"}


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
