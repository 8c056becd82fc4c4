"""The ``sartiq`` command line: catalog entries, generations, watching, and finding outputs."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import enums_pb2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sartiq", description=__doc__)
    parser.add_argument("--target", default="127.0.0.1:50051", help="server host:port")
    commands = parser.add_subparsers(dest="command", required=True)
    for kind in ("subject", "product", "style"):
        sub = commands.add_parser(kind, help=f"create a {kind} from image files")
        sub.add_argument("name")
        sub.add_argument("--description", default="")
        sub.add_argument("--image", action="append", default=[], type=Path)
    gen = commands.add_parser("generate", help="start a GENERATE generation; prints its id")
    gen.add_argument("--subject", default="")
    gen.add_argument("--product", default="")
    gen.add_argument("--style", default="")
    gen.add_argument("--shot", required=True, help='shot type, e.g. "full-body front"')
    gen.add_argument("--batch", type=int, default=1)
    gen.add_argument("--width", type=int, default=0)
    gen.add_argument("--height", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--prompt", default="")
    gen.add_argument("--auto-prompt", action="store_true")
    gen.add_argument("--request-id", default="")
    for name, help_text in (
        ("get", "print a generation as JSON"),
        ("watch", "print events until the end"),
        ("cancel", "cancel a generation"),
        ("outputs", "print the output file of each completed prediction"),
    ):
        commands.add_parser(name, help=help_text).add_argument("generation_id")
    commands.add_parser("list", help="list recent generations")
    commands.add_parser("health", help="exit 0 when the server reports SERVING")
    return parser


async def _health(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise SystemExit(f"not serving: {response.status}")
    print("SERVING")


async def _run(args: argparse.Namespace) -> None:
    if args.command == "health":
        await _health(args.target)
        return
    async with SartiqClient(args.target) as client:
        if args.command in ("subject", "product", "style"):
            images = [path.read_bytes() for path in args.image]
            entity = await client.create_entity(
                args.command, args.name, description=args.description, images=images
            )
            print(entity.id)
        elif args.command == "generate":
            params = {
                "subject_id": args.subject,
                "product_id": args.product,
                "style_id": args.style,
                "shot_type_string": args.shot,
                "batch_size": args.batch,
                "width": args.width,
                "height": args.height,
                "generated_prompt": args.prompt,
                "auto_generate_prompt": args.auto_prompt,
            }
            if args.seed is not None:
                params["seed"] = args.seed
            generation = await client.generate(request_id=args.request_id, **params)
            print(generation.id)
        elif args.command == "get":
            print(json_format.MessageToJson(await client.get(args.generation_id)))
        elif args.command == "cancel":
            generation = await client.cancel(args.generation_id)
            print(enums_pb2.GenerationStatus.Name(generation.status))
        elif args.command == "watch":
            async for event in client.watch(args.generation_id):
                payload = event.WhichOneof("payload") or ""
                detail = json_format.MessageToDict(getattr(event, payload)) if payload else {}
                print(event.sequence, enums_pb2.EventKind.Name(event.kind), detail, flush=True)
        elif args.command == "outputs":
            generation = await client.get(args.generation_id)
            for prediction in generation.predictions:
                if prediction.artifact.uri:
                    print(prediction.artifact.uri.removeprefix("file://"))
        else:
            generations, _ = await client.list()
            for item in generations:
                status = enums_pb2.GenerationStatus.Name(item.status)
                print(item.id, status, item.create_time.ToJsonString())


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; gRPC errors print their status and exit non-zero."""
    args = _parser().parse_args(argv)
    try:
        asyncio.run(_run(args))
    except grpc.aio.AioRpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
