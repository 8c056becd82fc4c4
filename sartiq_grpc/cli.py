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
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn

from sartiq_grpc import errors, replay
from sartiq_grpc.client import SartiqClient, StrategyParams, agentic, tls_credentials
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, resources_pb2

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
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    parser.add_argument("--ca-file", type=Path, help="PEM roots to trust (implies --tls)")
    parser.add_argument("--cert-file", type=Path, help="client certificate, for mutual TLS")
    parser.add_argument("--key-file", type=Path, help="client key, for mutual TLS")
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
    _agentic_arguments(gen)
    _strategy_commands(commands)
    for name, help_text in (
        ("get", "print a generation as JSON"),
        ("cancel", "cancel a generation"),
    ):
        commands.add_parser(name, help=help_text).add_argument("generation_id")
    watch = commands.add_parser("watch", help="show progress per prediction until the end")
    watch.add_argument("generation_id")
    watch.add_argument("--json", action="store_true", help="print each event as a JSON line")
    ref = commands.add_parser(
        "ref", help="print prediction:<id> of a completed prediction, to use as an input"
    )
    ref.add_argument("generation_id")
    ref.add_argument("--index", type=int, default=0, help="which prediction (default 0)")
    outputs = commands.add_parser("outputs", help="download every completed output")
    outputs.add_argument("generation_id")
    outputs.add_argument("--dir", type=Path, default=Path("."), help="where to write them")
    commands.add_parser("list", help="list recent generations")
    commands.add_parser("capabilities", help="what the server runs, as JSON")
    commands.add_parser("health", help="exit 0 when the server reports SERVING")
    return parser


_IMAGE_HELP = (
    "an image: a local file (uploaded first) or a reference "
    "(prediction:<id>, artifact:<sha256>, file:///path on the server, http(s)://...)"
)


def _strategy_commands(commands: Any) -> None:
    """One subcommand per strategy besides GENERATE; each prints the new generation's id."""
    edit = commands.add_parser("edit", help="start an EDITING generation")
    edit.add_argument("image", help=_IMAGE_HELP)
    edit.add_argument("--tool", choices=("EDIT", "SUBJECT_SWAP", "PRODUCT_ENHANCEMENT"))
    edit.add_argument("--reference", action="append", default=[], help=_IMAGE_HELP)
    edit.add_argument("--subject", default="")
    edit.add_argument("--product", default="")
    edit.add_argument("--width", type=int, default=0)
    edit.add_argument("--height", type=int, default=0)
    edit.add_argument("--detail", action="store_true", help="add the detail-enhancer pass")
    edit.add_argument("--prompt", default="")
    refine = commands.add_parser("refine", help="start a REFINE generation (upscale, faces)")
    refine.add_argument("image", help=_IMAGE_HELP)
    refine.add_argument("--factor", type=float, default=0.0, help="upscale factor, 1-4")
    refine.add_argument("--target-width", type=int, default=0)
    refine.add_argument("--target-height", type=int, default=0)
    refine.add_argument("--stages", type=int, default=0, help="upscale stages, 1-10")
    refine.add_argument("--denoise", type=float, help="denoise per stage, 0-1")
    refine.add_argument("--no-upscale", action="store_true")
    refine.add_argument("--face-detail", action="store_true")
    refine.add_argument("--face-steps", type=int, default=0)
    refine.add_argument("--batch", type=int, default=1)
    video = commands.add_parser("video", help="start a VIDEO generation (camera motion)")
    video.add_argument("image", help=_IMAGE_HELP)
    video.add_argument("--fps", type=int, default=0)
    video.add_argument("--duration", type=float, help="seconds, 0.5-30")
    video.add_argument("--motion", type=int, default=0, help="motion bucket, 1-255")
    background = commands.add_parser("background", help="start a BACKGROUND_FIXING generation")
    background.add_argument("image", help=_IMAGE_HELP)
    background.add_argument("--prompt", default="", help='e.g. "white seamless studio"')
    background.add_argument("--background", default="", help=_IMAGE_HELP)
    background.add_argument("--expand", type=int, default=0, help="mask expansion, px")
    adjust = commands.add_parser("adjust", help="start an IMAGE_ADJUSTING generation")
    adjust.add_argument("image", help=_IMAGE_HELP)
    for name in ("brightness", "contrast", "saturation"):
        adjust.add_argument(f"--{name}", type=float, help="-1 to 1")
    adjust.add_argument("--prompt", default="", help='hints, e.g. "warmer, more contrast"')
    face = commands.add_parser("face-fix", help="start a FACE_FIXING generation")
    face.add_argument("image", help=_IMAGE_HELP)
    face.add_argument("--strength", type=float, help="0 to 1")
    face.add_argument("--prompt", default="")
    for sub in (edit, refine, video, background, adjust, face):
        sub.add_argument("--seed", type=int)
        sub.add_argument("--request-id", default="")
        _agentic_arguments(sub)


def _agentic_arguments(sub: argparse.ArgumentParser) -> None:
    group = sub.add_argument_group("AGENTIC (evaluate, adjust and retry)")
    group.add_argument("--agentic", action="store_true", help="orchestrate as AGENTIC")
    group.add_argument("--max-attempts", type=int, help="attempts in all, 1-10 (default 3)")
    group.add_argument("--min-score", type=float, help="accept at this score, 0-1 (default 0.7)")
    group.add_argument("--evaluator", default="", help='evaluation provider (default "auto")')


def _orchestration(args: argparse.Namespace) -> resources_pb2.Orchestration | None:
    if not (args.agentic or args.max_attempts or args.min_score is not None or args.evaluator):
        return None
    return agentic(args.max_attempts, args.min_score, args.evaluator)


_SCHEMES = ("prediction:", "artifact:", "file://", "http://", "https://")


async def _image(client: SartiqClient, value: str) -> str:
    """A reference as given, or a local file uploaded and named by its artifact."""
    if not value or value.startswith(_SCHEMES):
        return value
    data = await asyncio.to_thread(Path(value).read_bytes)
    return f"artifact:{(await client.upload(data)).sha256}"


def _set(params: dict[str, Any], **values: Any) -> dict[str, Any]:
    """``params`` with every value that is not None."""
    params.update({k: v for k, v in values.items() if v is not None})
    return params


async def _strategy_params(client: SartiqClient, args: argparse.Namespace) -> StrategyParams:
    base = await _image(client, args.image)
    common = _set({}, seed=args.seed)
    if args.command == "edit":
        references = [await _image(client, ref) for ref in args.reference]
        tool = f"EDITING_TOOL_{args.tool}" if args.tool else "EDITING_TOOL_UNSPECIFIED"
        return resources_pb2.EditingParams(
            base_img_path=base,
            reference_images=references,
            subject_id=args.subject,
            product_id=args.product,
            tool=enums_pb2.EditingTool.Value(tool),
            width=args.width,
            height=args.height,
            detail_enhancer=args.detail,
            prompt=args.prompt,
            **common,
        )
    if args.command == "refine":
        return resources_pb2.RefineParams(
            base_image_url=base,
            batch_size=args.batch,
            target_width=args.target_width,
            target_height=args.target_height,
            upscale_enabled=not args.no_upscale,
            upscale_factor=args.factor,
            upscale_steps=args.stages,
            face_detail_enabled=args.face_detail,
            face_detail_steps=args.face_steps,
            **_set(common, upscale_denoise=args.denoise),
        )
    if args.command == "video":
        video = resources_pb2.VideoParams(
            base_image_url=base, fps=args.fps, motion_bucket_id=args.motion, **common
        )
        if args.duration is not None:
            video.duration.FromNanoseconds(round(args.duration * 1e9))
        return video
    if args.command == "background":
        return resources_pb2.BackgroundFixingParams(
            base_image_url=base,
            background_prompt=args.prompt,
            background_image_url=await _image(client, args.background),
            mask_expansion=args.expand,
            **common,
        )
    if args.command == "adjust":
        return resources_pb2.ImageAdjustingParams(
            base_image_url=base,
            prompt=args.prompt,
            **_set(
                common,
                brightness=args.brightness,
                contrast=args.contrast,
                saturation=args.saturation,
            ),
        )
    return resources_pb2.FaceFixingParams(
        base_image_url=base, prompt=args.prompt, **_set(common, strength=args.strength)
    )


def _prediction_progress(prediction: resources_pb2.Prediction) -> float:
    """How far a prediction's task chain is, 0 to 1."""
    if prediction.done:
        return 1.0
    tasks = prediction.tasks
    if not tasks:
        return 0.0
    return sum(1.0 if t.done else t.progress for t in tasks) / len(tasks)


async def _watch(client: SartiqClient, args: argparse.Namespace) -> None:
    if args.json:
        async for event in client.watch(args.generation_id):
            print(json_format.MessageToJson(event, indent=None), flush=True)
        return
    tree: resources_pb2.Generation | None = None
    bars: dict[str, TaskID] = {}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=False),
    ) as progress:
        async for event in client.watch(args.generation_id):
            tree = replay.apply(tree, event)
            for prediction in tree.predictions:
                status = enums_pb2.PredictionStatus.Name(prediction.status)
                status = status.removeprefix("PREDICTION_STATUS_").lower()
                if prediction.id not in bars:
                    label = f"prediction {prediction.index}"
                    bars[prediction.id] = progress.add_task(label, total=1.0, status=status)
                progress.update(
                    bars[prediction.id],
                    completed=_prediction_progress(prediction),
                    status=status,
                )
    if tree is not None:
        name = enums_pb2.GenerationStatus.Name(tree.status).removeprefix("GENERATION_STATUS_")
        print(f"{tree.id} {name}")
        for prediction in tree.predictions:
            if prediction.HasField("error"):
                print(f"  prediction {prediction.index}: {prediction.error.message}")
            elif prediction.artifact.sha256:
                print(f"  prediction {prediction.index}: artifact:{prediction.artifact.sha256}")
            if prediction.HasField("agentic"):
                _print_attempts(prediction.agentic)


def _print_attempts(shot: resources_pb2.OrchestratedShot) -> None:
    """One line per attempt, then which one was accepted and why attempting stopped."""
    for attempt in shot.attempts:
        status = enums_pb2.AttemptStatus.Name(attempt.status).removeprefix("ATTEMPT_STATUS_")
        if attempt.HasField("evaluation"):
            outcome = f"score {attempt.evaluation.score:.2f} ({attempt.evaluation.feedback})"
        else:
            outcome = attempt.error.message or status.lower()
        print(f"    attempt {attempt.number}: {outcome}")
        if attempt.adjustment_reason:
            print(f"      why: {attempt.adjustment_reason}")
    reason = enums_pb2.StopReason.Name(shot.stop_reason).removeprefix("STOP_REASON_")
    if shot.best_attempt:
        print(f"    accepted attempt {shot.best_attempt} ({reason.lower()})")


async def _health(target: str, credentials: grpc.ChannelCredentials | None) -> None:
    channel = (
        grpc.aio.insecure_channel(target)
        if credentials is None
        else grpc.aio.secure_channel(target, credentials)
    )
    async with channel:
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
    generation = await client.generate(
        request_id=args.request_id, orchestration=_orchestration(args), **params
    )
    print(generation.id)


async def _ref(client: SartiqClient, args: argparse.Namespace) -> None:
    generation = await client.get(args.generation_id)
    found = [p for p in generation.predictions if p.index == args.index]
    if not found:
        raise SystemExit(f"error: generation {args.generation_id} has no prediction {args.index}")
    prediction = found[0]
    if prediction.status != enums_pb2.PREDICTION_STATUS_COMPLETED:
        status = enums_pb2.PredictionStatus.Name(prediction.status)
        raise SystemExit(f"error: prediction {args.index} is {status}, not COMPLETED yet")
    print(f"prediction:{prediction.id}")


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
    credentials = None
    if args.tls or args.ca_file or args.cert_file:
        credentials = tls_credentials(args.ca_file, args.cert_file, args.key_file)
    if args.command == "health":
        await _health(args.target, credentials)
        return
    async with SartiqClient(args.target, api_key=args.api_key, credentials=credentials) as client:
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
        elif args.command in _STRATEGY_COMMANDS:
            params = await _strategy_params(client, args)
            created = await client.create(
                params, request_id=args.request_id, orchestration=_orchestration(args)
            )
            print(created.id)
        elif args.command == "watch":
            await _watch(client, args)
        elif args.command == "outputs":
            await _outputs(client, args)
        elif args.command == "ref":
            await _ref(client, args)
        elif args.command == "capabilities":
            print(json_format.MessageToJson(await client.capabilities()))
        else:
            generations, _ = await client.list()
            for item in generations:
                status = enums_pb2.GenerationStatus.Name(item.status)
                print(item.id, status, item.create_time.ToJsonString())


_STRATEGY_COMMANDS = ("edit", "refine", "video", "background", "adjust", "face-fix")


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
