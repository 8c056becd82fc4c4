"""The v1 contract as a client meets it: capabilities, done flags, errors, catalog shapes."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import pytest
from conftest import make_settings
from helpers import (
    CatalogStub,
    GenerationStub,
    generate_request,
    wait_submitted,
    wait_terminal,
)
from procs import run_process, server_env

from sartiq_grpc.sartiq.catalog.v1 import catalog_service_pb2 as catalog_pb
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, resources_pb2
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ServerSettings
from server.domain.enums import GenerationType
from server.domain.errors import StartupError, UnimplementedError
from server.orchestration.workflows import WorkflowRegistry


async def test_capabilities_say_what_runs(stub: GenerationStub) -> None:
    caps = await stub.GetCapabilities(pb.GetCapabilitiesRequest())
    by_strategy = {s.strategy: s for s in caps.strategies}
    assert len(by_strategy) == 7
    generate = by_strategy[enums_pb2.STRATEGY_GENERATE]
    assert generate.available
    assert generate.method == "/sartiq.generation.v1.GenerationService/CreateGenerateGeneration"
    assert list(generate.task_types) == [enums_pb2.COMPUTE_TASK_TYPE_GENERATION]
    limits = {limit.field: limit for limit in generate.limits}
    assert (limits["params.width"].minimum, limits["params.width"].maximum) == (64, 4096)
    assert limits["params.batch_size"].maximum == 16
    editing = by_strategy[enums_pb2.STRATEGY_EDITING]
    assert editing.available
    assert list(editing.task_types) == [
        enums_pb2.COMPUTE_TASK_TYPE_EDITING,
        enums_pb2.COMPUTE_TASK_TYPE_DETAIL_ENHANCER,
    ]
    assert list(caps.generation_types) == [
        enums_pb2.GENERATION_TYPE_BASE,
        enums_pb2.GENERATION_TYPE_AGENTIC,
    ]
    assert list(caps.evaluation_providers) == ["auto", "local"]
    assert caps.compute_backend == "fake"
    assert caps.max_upload_bytes > 30_000_000


def test_an_orchestration_type_without_a_workflow_is_unimplemented() -> None:
    registry = WorkflowRegistry({})
    with pytest.raises(UnimplementedError) as caught:
        registry.get(GenerationType.AGENTIC)
    assert caught.value.metadata == {"feature": "GENERATION_TYPE_AGENTIC"}
    assert registry.types == ()


async def test_done_is_false_until_terminal_then_true(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.hold = True
    created = (await stub.CreateGenerateGeneration(generate_request(product_id))).generation
    assert not created.done
    assert not created.predictions[0].done
    assert not created.predictions[0].tasks[0].done
    await wait_submitted(fake_compute, 1)
    fake_compute.complete(next(iter(fake_compute.tasks)))
    done = await wait_terminal(stub, created.id)
    assert done.done
    assert done.predictions[0].done
    assert done.predictions[0].tasks[0].done


async def test_lora_is_unset_when_none_was_given_and_needs_a_uri(catalog: CatalogStub) -> None:
    created = await catalog.CreateSubject(catalog_pb.CreateSubjectRequest(name="Ana"))
    assert not created.subject.HasField("lora")
    with_lora = await catalog.CreateSubject(
        catalog_pb.CreateSubjectRequest(
            name="Bo", lora=catalog_pb.Lora(uri="s3://loras/bo.safetensors", default_weight=0)
        )
    )
    assert with_lora.subject.lora.uri == "s3://loras/bo.safetensors"
    assert with_lora.subject.lora.HasField("default_weight")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await catalog.CreateSubject(
            catalog_pb.CreateSubjectRequest(name="Cy", lora=catalog_pb.Lora(default_weight=1))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_resource_errors_carry_code_reason_domain_and_metadata(
    stub: GenerationStub, fake_compute: FakeComputeBackend, product_id: str
) -> None:
    fake_compute.fail_with = ("capacity", "no GPU free")
    created = (await stub.CreateGenerateGeneration(generate_request(product_id))).generation
    done = await wait_terminal(stub, created.id)
    error = done.predictions[0].error
    assert isinstance(error, resources_pb2.ResourceError)
    assert (error.code, error.reason, error.domain) == (8, "COMPUTE_FAILED", "generation.sartiq")
    assert error.metadata["category"] == "capacity"
    assert done.error.reason == "NO_PREDICTION_COMPLETED"
    assert done.error.metadata["prediction_id"] == done.predictions[0].id


async def test_a_second_server_on_the_same_port_refuses_to_start(tmp_path: Path) -> None:
    first = App(make_settings(tmp_path / "one"), compute=FakeComputeBackend())
    async with first:
        taken = ServerSettings(port=first.port, grace_period=1.0)
        second = make_settings(tmp_path / "two").model_copy(update={"server": taken})
        with pytest.raises(StartupError, match="address is in use"):
            async with App(second, compute=FakeComputeBackend()):
                pass
        env = server_env(tmp_path / "two", SERVER__PORT=str(first.port))
        child = await run_process([sys.executable, "-m", "server"], env=env)
        assert child.returncode == 2
        assert "cannot listen on" in child.stderr
