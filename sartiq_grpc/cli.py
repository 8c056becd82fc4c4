"""The ``sartiq`` command line: uploads, catalog entries, generations, watching, downloads.

Everything goes over gRPC, so it works from any machine that reaches the server:
``--target host:port`` (or ``SARTIQ_TARGET``) and ``--api-key`` (or ``SARTIQ_API_KEY``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sartiq_grpc import errors
from sartiq_grpc.client import SartiqClient
from sartiq_grpc.sartiq.generation.v1 import enums_pb2

_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "video/mp4": ".mp4",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sartiq", description=__doc__)
    parser.add_argument(
        "--target", default=os.environ.get("SARTIQ_TARGET", "127.0.0.1:50051"), help="host:port"
    )
    parser.add_argument("--api-key", default=os.environ.get("SARTIQ_API_KEY", ""))
    commands = parser.add_subparsers(dest="command", required=True)
    upload = commands.add_parser("upload", help="upload an image; prints artifact:<sha256>")
    upload.add_argument("file", type=Path)
    for kind in ("subject", "product", "style"):
        sub = commands.add_parser(kind, help=f"create a {kind} from image files; prints its id")
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
    ):
        commands.add_parser(name, help=help_text).add_argument("generation_id")
    outputs = commands.add_parser("outputs", help="download every completed output")
    outputs.add_argument("generation_id")
    outputs.add_argument("--dir", type=Path, default=Path("."), help="where to write them")
    commands.add_parser("list", help="list recent generations")
    commands.add_parser("capabilities", help="what the server runs, as JSON")
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


async def _entity(client: SartiqClient, args: argparse.Namespace) -> None:
    # Each image is uploaded first, so any size up to the server's upload limit works.
    shas = [(await client.upload(path.read_bytes())).sha256 for path in args.image]
    entity = await client.create_entity(
        args.command, args.name, description=args.description, artifacts=shas
    )
    print(entity.id)


async def _generate(client: SartiqClient, args: argparse.Namespace) -> None:
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


async def _outputs(client: SartiqClient, args: argparse.Namespace) -> None:
    generation = await client.get(args.generation_id)
    args.dir.mkdir(parents=True, exist_ok=True)
    for prediction in generation.predictions:
        artifact = prediction.artifact
        if not artifact.sha256:
            continue
        path = args.dir / f"{prediction.id}{_EXTENSIONS.get(artifact.mime_type, '.bin')}"
        path.unlink(missing_ok=True)
        await client.download(artifact.sha256, path)
        print(path)


async def _run(args: argparse.Namespace) -> None:
    if args.command == "health":
        await _health(args.target)
        return
    async with SartiqClient(args.target, api_key=args.api_key) as client:
        if args.command == "upload":
            print(f"artifact:{(await client.upload(args.file.read_bytes())).sha256}")
        elif args.command in ("subject", "product", "style"):
            await _entity(client, args)
        elif args.command == "generate":
            await _generate(client, args)
        elif args.command == "get":
            print(json_format.MessageToJson(await client.get(args.generation_id)))
        elif args.command == "cancel":
            generation = await client.cancel(args.generation_id)
            print(enums_pb2.GenerationStatus.Name(generation.status))
        elif args.command == "watch":
            async for event in client.watch(args.generation_id):
                payload = event.WhichOneof("payload") or ""
                detail = getattr(event, payload) if payload else None
                status = enums_pb2.EventKind.Name(event.kind)
                summary = json_format.MessageToDict(detail) if detail is not None else {}
                print(event.sequence, status, summary.get("status", ""), flush=True)
        elif args.command == "outputs":
            await _outputs(client, args)
        elif args.command == "capabilities":
            print(json_format.MessageToJson(await client.capabilities()))
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
    except errors.InvalidArgumentError as error:
        print(f"error: {error}", file=sys.stderr)
        for field, why in sorted(error.violations.items()):
            print(f"  {field}: {why}", file=sys.stderr)
        raise SystemExit(1) from None
    except errors.SartiqError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except grpc.aio.AioRpcError as error:  # calls the client makes without its wrapper
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
