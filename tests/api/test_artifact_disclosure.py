"""Artifacts reveal nothing: no server path in any answer, and each tenant's own create time."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from conftest import make_settings
from google.protobuf import text_format
from google.protobuf.message import Message
from helpers import CatalogStub, GenerationStub, generate_request, png_bytes, wait_terminal

from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2 as cat
from sartiq_grpc.sartiq.generation.v1 import artifact_service_pb2 as art
from sartiq_grpc.sartiq.generation.v1 import (
    artifact_service_pb2_grpc,
    enums_pb2,
    resources_pb2,
)
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend, tiny_png
from server.config import ApiKey, AuthSettings, Settings
from server.evaluation.base import Evaluators
from server.evaluation.fake import ScriptedEvaluator

KEYS = {"org-a": "tenant-a-key-0123456789", "org-b": "tenant-b-key-0123456789"}
ArtifactStub = artifact_service_pb2_grpc.ArtifactServiceStub


def _settings(tmp_path: Path) -> Settings:
    keys = tuple(ApiKey(organization=org, key=key) for org, key in KEYS.items())
    return make_settings(tmp_path).model_copy(update={"auth": AuthSettings(api_keys=keys)})


def _auth(org: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[org]}"),)


def _app(settings: Settings) -> App:
    return App(
        settings,
        compute=FakeComputeBackend(),
        evaluators=Evaluators({"local": ScriptedEvaluator([0.9])}),
    )


async def _upload(channel: grpc.aio.Channel, org: str, data: bytes) -> art.UploadArtifactResponse:
    async def parts() -> AsyncIterator[art.UploadArtifactRequest]:
        yield art.UploadArtifactRequest(header=art.UploadArtifactHeader(size_bytes=len(data)))
        yield art.UploadArtifactRequest(chunk=data)

    response: art.UploadArtifactResponse = await ArtifactStub(channel).UploadArtifact(
        parts(), metadata=_auth(org)
    )
    return response


def _artifacts(message: Message) -> list[resources_pb2.Artifact]:
    """Every Artifact inside ``message``, however deep."""
    if isinstance(message, resources_pb2.Artifact):
        return [message]
    found: list[resources_pb2.Artifact] = []
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        for child in value if field.is_repeated else [value]:
            found.extend(_artifacts(child))
    return found


class Answers:
    """Every message the server sent, to search for what it must not say."""

    def __init__(self, *forbidden: str) -> None:
        self.forbidden = forbidden
        self.messages: list[Message] = []

    def add(self, *messages: Message) -> None:
        self.messages.extend(messages)

    def check(self) -> int:
        """Assert nothing forbidden appears; returns how many artifacts were seen."""
        seen = 0
        for message in self.messages:
            text = text_format.MessageToString(message)
            for word in self.forbidden:
                assert word not in text, f"{word!r} in {type(message).__name__}:\n{text}"
            for artifact in _artifacts(message):
                assert artifact.uri == f"artifacts/{artifact.sha256}"
                seen += 1
        return seen


async def _walk(channel: grpc.aio.Channel, answers: Answers) -> tuple[str, str]:
    """Call every RPC that returns artifacts as org-a; the generation's and product's ids."""
    a = _auth("org-a")
    uploaded = await _upload(channel, "org-a", png_bytes((10, 200, 30)))
    sha = uploaded.artifact.sha256
    artifacts = ArtifactStub(channel)
    got = await artifacts.GetArtifact(art.GetArtifactRequest(sha256=sha), metadata=a)
    download = [
        m
        async for m in artifacts.DownloadArtifact(
            art.DownloadArtifactRequest(sha256=sha), metadata=a
        )
    ]
    answers.add(uploaded, got, download[0])

    catalog = CatalogStub(channel)
    images = [cat.ImageInput(artifact=f"artifact:{sha}"), cat.ImageInput(data=png_bytes((9, 9, 9)))]
    product = await catalog.CreateProduct(
        cat.CreateProductRequest(name="dress", reference_images=images), metadata=a
    )
    product_id = product.product.id
    answers.add(
        product,
        await catalog.GetProduct(cat.GetProductRequest(product_id=product_id), metadata=a),
        await catalog.ListProducts(cat.ListProductsRequest(), metadata=a),
    )

    stub = GenerationStub(channel)
    request = generate_request(product_id, batch=2)
    request.orchestration.type = enums_pb2.GENERATION_TYPE_AGENTIC  # attempts have outputs too
    created = await stub.CreateGenerateGeneration(request, metadata=a)
    generation_id = created.generation.id
    done = await wait_terminal(stub, generation_id, metadata=a)
    assert done.status == enums_pb2.GENERATION_STATUS_COMPLETED
    answers.add(
        created,
        await stub.GetGeneration(pb.GetGenerationRequest(generation_id=generation_id), metadata=a),
        await stub.ListGenerations(pb.ListGenerationsRequest(), metadata=a),
    )
    await _watch(stub, generation_id, answers)
    return generation_id, product_id


async def _watch(stub: GenerationStub, generation_id: str, answers: Answers) -> None:
    """Both watch streams: the generation's whole log, and the organization's."""
    a = _auth("org-a")
    one = stub.WatchGeneration(pb.WatchGenerationRequest(generation_id=generation_id), metadata=a)
    events = [item async for item in one]
    answers.add(*events)
    many = stub.WatchGenerations(pb.WatchGenerationsRequest(after_cursor=0), metadata=a)
    async for item in many:
        answers.add(item)
        if item.event.terminal:
            break
    many.cancel()


async def test_no_answer_names_a_server_path(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    root = str(settings.media.artifact_dir)
    answers = Answers("file:", root, str(tmp_path))
    async with _app(settings) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        generation_id, product_id = await _walk(ch, answers)
    # upload, get, download, 2 reference images x 3, and outputs of predictions and attempts
    assert answers.check() >= 9

    # A database written before artifacts were named: paths in the artifact rows and in
    # the stored events. What the server sends must still name, not locate.
    with sqlite3.connect(tmp_path / "sartiq.db") as db:
        db.execute("UPDATE artifacts SET uri = 'file://' || ? || '/' || sha256", (root,))
        rows = db.execute(
            "SELECT generation_id, sequence, payload_proto FROM generation_events"
        ).fetchall()
        legacy = 0
        for gid, sequence, data in rows:
            event = resources_pb2.GenerationEvent.FromString(data)
            for artifact in _artifacts(event):
                artifact.uri = f"file://{root}/{artifact.sha256[:2]}/{artifact.sha256}.png"
                legacy += 1
            db.execute(
                "UPDATE generation_events SET payload_proto = ?"
                " WHERE generation_id = ? AND sequence = ?",
                (event.SerializeToString(), gid, sequence),
            )
    assert legacy
    again = Answers("file:", root, str(tmp_path))
    async with _app(settings) as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = GenerationStub(ch)
        a = _auth("org-a")
        request = pb.GetGenerationRequest(generation_id=generation_id)
        again.add(await stub.GetGeneration(request, metadata=a))
        await _watch(stub, generation_id, again)
        catalog = CatalogStub(ch)
        got = await catalog.GetProduct(cat.GetProductRequest(product_id=product_id), metadata=a)
        assert got.product.reference_images
        for image in got.product.reference_images:
            assert image.uri == f"artifacts/{image.sha256}"
        again.add(got)
    assert again.check() >= legacy


async def test_each_organization_sees_when_it_first_held_an_artifact(tmp_path: Path) -> None:
    async with (
        _app(_settings(tmp_path)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        artifacts = ArtifactStub(channel)

        async def held(org: str, sha: str) -> int:
            got = await artifacts.GetArtifact(
                art.GetArtifactRequest(sha256=sha), metadata=_auth(org)
            )
            return int(got.artifact.create_time.ToNanoseconds())

        # Uploads: B uploading what A uploaded earlier learns nothing of A's time.
        data = png_bytes((120, 30, 200))
        first = (await _upload(channel, "org-a", data)).artifact
        second = (await _upload(channel, "org-b", data)).artifact
        assert first.sha256 == second.sha256
        assert second.create_time.ToNanoseconds() > first.create_time.ToNanoseconds()
        assert await held("org-b", first.sha256) == second.create_time.ToNanoseconds()
        assert await held("org-a", first.sha256) == first.create_time.ToNanoseconds()
        again = (await _upload(channel, "org-b", data)).artifact  # B held it already
        assert again.create_time == second.create_time

        # Outputs. The fake compute returns the same bytes for the same task number, so
        # the tenants can hold A's outputs before A makes them: B the first one's, A the
        # second's (uploaded by A itself).
        by_b = (await _upload(channel, "org-b", tiny_png("fake-1", 64, 64).data)).artifact
        by_a = (await _upload(channel, "org-a", tiny_png("fake-2", 64, 64).data)).artifact
        catalog = CatalogStub(channel)
        product = await catalog.CreateProduct(
            cat.CreateProductRequest(
                name="dress", reference_images=[cat.ImageInput(artifact=f"artifact:{first.sha256}")]
            ),
            metadata=_auth("org-a"),
        )
        stub = GenerationStub(channel)
        one = await _generate(stub, product.product.id)
        made = one.predictions[0].artifact
        assert made.sha256 == by_b.sha256
        assert made.create_time.ToNanoseconds() >= one.create_time.ToNanoseconds()
        assert await held("org-a", made.sha256) == made.create_time.ToNanoseconds()
        assert await held("org-b", made.sha256) == by_b.create_time.ToNanoseconds()
        assert await _told(stub, one.id) == {made.create_time.ToNanoseconds()}

        two = await _generate(stub, product.product.id)
        remade = two.predictions[0].artifact
        assert remade.sha256 == by_a.sha256
        assert remade.create_time == by_a.create_time  # A held these bytes first
        assert await _told(stub, two.id) == {by_a.create_time.ToNanoseconds()}


async def _generate(stub: GenerationStub, product_id: str) -> resources_pb2.Generation:
    created = await stub.CreateGenerateGeneration(
        generate_request(product_id), metadata=_auth("org-a")
    )
    return await wait_terminal(stub, created.generation.id, metadata=_auth("org-a"))


async def _told(stub: GenerationStub, generation_id: str) -> set[int]:
    """The create times org-a's events give the generation's outputs."""
    watch = stub.WatchGeneration(
        pb.WatchGenerationRequest(generation_id=generation_id), metadata=_auth("org-a")
    )
    return {
        item.event.prediction.artifact.create_time.ToNanoseconds()
        async for item in watch
        if item.event.prediction.HasField("artifact")
    }
