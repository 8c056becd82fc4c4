"""The ``sartiq`` command line: uploads, catalog entries, generations, watching, downloads.

Everything goes over gRPC, so it works from any machine that reaches the server:
``--target host:port`` (or ``SARTIQ_TARGET``) and ``--api-key`` (or ``SARTIQ_API_KEY``).
It fails like a tool: one line on stderr and a documented exit status (see
``sartiq_grpc.cli_failures``), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format

from sartiq_grpc import errors
from sartiq_grpc.cli_failures import (
    EXIT_FAILURE,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CliError,
    describe,
    is_reference,
    local_failure,
    normalize_reference,
    one_line,
    read_local,
)
from sartiq_grpc.cli_parser import ENTITY_COMMANDS, STRATEGY_COMMANDS, build_parser
from sartiq_grpc.cli_watch import watch
from sartiq_grpc.client import SartiqClient, StrategyParams, agentic
from sartiq_grpc.sartiq.generation.v1 import enums_pb2, resources_pb2

__all__ = ["build_parser", "main"]

# A healthy server connects at once; only a longer wait is worth a notice.
_QUIET_WAIT = 0.5
_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "video/mp4": ".mp4",
}


def _orchestration(args: argparse.Namespace) -> resources_pb2.Orchestration | None:
    if not (args.agentic or args.max_attempts or args.min_score is not None or args.evaluator):
        return None
    return agentic(args.max_attempts, args.min_score, args.evaluator)


def _local_files(args: argparse.Namespace) -> dict[str, bytes]:
    """Every local file the command names, read now: a bad path fails before any call."""
    if args.command == "upload":
        paths = [args.file]  # always a local file, even when it looks like a URL
    elif args.command in ENTITY_COMMANDS:
        paths = list(args.image)
    elif args.command in STRATEGY_COMMANDS:
        images = [args.image, *getattr(args, "reference", []), getattr(args, "background", "")]
        paths = [value for value in images if value and not is_reference(value)]
    else:
        paths = []
    return {path: read_local(path) for path in paths}


async def _image(client: SartiqClient, value: str, local: dict[str, bytes]) -> str:
    """A reference (scheme in lower case), or a local file uploaded and named by its artifact."""
    if not value or is_reference(value):
        return normalize_reference(value)
    return f"artifact:{(await client.upload(local[value])).sha256}"


def _set(params: dict[str, Any], **values: Any) -> dict[str, Any]:
    """``params`` with every value that is not None."""
    params.update({k: v for k, v in values.items() if v is not None})
    return params


async def _strategy_params(
    client: SartiqClient, args: argparse.Namespace, local: dict[str, bytes]
) -> StrategyParams:
    base = await _image(client, args.image, local)
    references = [await _image(client, ref, local) for ref in getattr(args, "reference", [])]
    background = await _image(client, getattr(args, "background", ""), local)
    with _out_of_range():
        return _strategy_message(args, base, references, background)


def _strategy_message(
    args: argparse.Namespace, base: str, references: list[str], background: str
) -> StrategyParams:
    common = _set({}, seed=args.seed)
    if args.command == "edit":
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
            background_image_url=background,
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


async def _health(client: SartiqClient, args: argparse.Namespace) -> None:
    status = await client.health()
    if status != "SERVING":
        raise CliError(EXIT_UNAVAILABLE, args.target, f"not serving ({status})")
    print(status)


async def _entity(client: SartiqClient, args: argparse.Namespace, local: dict[str, bytes]) -> None:
    # Each image is uploaded first, so any size up to the server's upload limit works.
    shas = [(await client.upload(local[path])).sha256 for path in args.image]
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
    with _out_of_range():
        request = resources_pb2.GenerateParams(**params)
    generation = await client.create(
        request, request_id=args.request_id, orchestration=_orchestration(args)
    )
    print(generation.id)


@contextlib.contextmanager
def _out_of_range() -> Iterator[None]:
    """Turn protobuf's refusal of a number its field cannot hold into a usage failure."""
    try:
        yield
    except ValueError as exc:  # e.g. "Value out of range: 99999999999" for an int32
        raise CliError(EXIT_USAGE, "arguments", str(exc)) from None


async def _ref(client: SartiqClient, args: argparse.Namespace) -> None:
    generation = await client.get(args.generation_id)
    found = [p for p in generation.predictions if p.index == args.index]
    if not found:
        what = f"generation {args.generation_id}"
        raise CliError(EXIT_NOT_FOUND, what, f"has no prediction {args.index}")
    prediction = found[0]
    if prediction.status != enums_pb2.PREDICTION_STATUS_COMPLETED:
        status = enums_pb2.PredictionStatus.Name(prediction.status)
        what = f"prediction {args.index} of {args.generation_id}"
        raise CliError(EXIT_FAILURE, what, f"is {status}, not COMPLETED yet")
    print(f"prediction:{prediction.id}")


async def _outputs(client: SartiqClient, args: argparse.Namespace) -> None:
    generation = await client.get(args.generation_id)
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise local_failure(args.dir, exc) from None
    for prediction in generation.predictions:
        artifact = prediction.artifact
        if not artifact.sha256:
            continue
        path = args.dir / f"{prediction.id}{_EXTENSIONS.get(artifact.mime_type, '.bin')}"
        try:
            path.unlink(missing_ok=True)
            await client.download(artifact.sha256, path)
        except OSError as exc:
            raise local_failure(path, exc) from None
        print(path)


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS credentials from the files named, each read (and checked) now; None: plaintext."""
    if not (args.tls or args.ca_file or args.cert_file or args.key_file):
        return None
    if bool(args.cert_file) != bool(args.key_file):
        raise CliError(EXIT_USAGE, "--cert-file/--key-file", "give both for mutual TLS")
    return grpc.ssl_channel_credentials(
        root_certificates=read_local(args.ca_file) if args.ca_file else None,
        private_key=read_local(args.key_file) if args.key_file else None,
        certificate_chain=read_local(args.cert_file) if args.cert_file else None,
    )


async def _connect(client: SartiqClient, target: str, within: float) -> None:
    """Wait for a connection, at most ``within`` seconds, saying so.

    Giving up is one line on stderr: "sartiq: HOST: waiting up to N s for the server
    (--connect-timeout)... gave up: <why>". On a terminal its first half shows as soon
    as the wait takes noticeably long, and is erased if the server then answers;
    elsewhere (logs, scripts) the whole line is written when giving up, so a slow but
    successful connection leaves stderr empty.

    Raises:
        CliError: no connection in time (exit status 5).
    """
    notice = f"sartiq: {target}: waiting up to {within:g} s for the server (--connect-timeout)... "
    live = sys.stderr.isatty()
    quiet = min(_QUIET_WAIT, within) if live else within
    try:
        await client.connect(quiet)
        return
    except errors.TransportError as error:
        if quiet >= within:
            raise CliError(
                EXIT_UNAVAILABLE, target, notice + f"gave up: {error}", bare=True
            ) from None
    sys.stderr.write(notice)
    sys.stderr.flush()
    try:
        await client.connect(within - quiet)
    except errors.TransportError as error:
        raise CliError(EXIT_UNAVAILABLE, target, f"gave up: {error}", bare=True) from None
    sys.stderr.write("\r\x1b[K")  # connected: the notice goes
    sys.stderr.flush()


async def _run(args: argparse.Namespace) -> None:
    local = _local_files(args)  # local faults first: they need no server to report
    credentials = _credentials(args)
    if args.connect_timeout <= 0:
        raise CliError(EXIT_USAGE, "--connect-timeout", "must be more than 0 seconds")
    async with SartiqClient(args.target, api_key=args.api_key, credentials=credentials) as client:
        await _connect(client, args.target, args.connect_timeout)
        await _dispatch(client, args, local)


async def _dispatch(
    client: SartiqClient, args: argparse.Namespace, local: dict[str, bytes]
) -> None:
    if args.command == "health":
        await _health(client, args)
    elif args.command == "upload":
        print(f"artifact:{(await client.upload(local[args.file])).sha256}")
    elif args.command in ENTITY_COMMANDS:
        await _entity(client, args, local)
    elif args.command == "generate":
        await _generate(client, args)
    elif args.command == "get":
        print(json_format.MessageToJson(await client.get(args.generation_id)))
    elif args.command == "cancel":
        generation = await client.cancel(args.generation_id)
        print(enums_pb2.GenerationStatus.Name(generation.status))
    elif args.command in STRATEGY_COMMANDS:
        params = await _strategy_params(client, args, local)
        created = await client.create(
            params, request_id=args.request_id, orchestration=_orchestration(args)
        )
        print(created.id)
    elif args.command == "watch":
        await watch(client, args)
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


def main(argv: Sequence[str] | None = None) -> None:
    """Run one command; every failure is one line on stderr and an exit status.

    The statuses are listed in ``sartiq --help`` (``cli_failures.EXIT_STATUS_HELP``).
    """
    args = build_parser().parse_args(argv)
    try:
        asyncio.run(_run(args))
    except CliError as failure:
        _exit(failure.status, failure.line())
    except errors.SartiqError as error:
        _exit_for(describe(error, args.target))
    except grpc.aio.AioRpcError as error:  # a call made without the client's wrapper
        _exit_for(describe(errors.from_rpc_error(error), args.target))
    except KeyboardInterrupt:
        _exit(130, "sartiq: interrupted")
    except BrokenPipeError:
        # stdout was closed early (``sartiq list | head -1``): nothing left to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(EXIT_FAILURE) from None
    except Exception as exc:
        if os.environ.get("SARTIQ_DEBUG"):
            raise
        why = f"{type(exc).__name__}: {exc} (SARTIQ_DEBUG=1 shows the traceback)"
        _exit(EXIT_FAILURE, one_line(f"sartiq: unexpected error: {why}"))


def _exit_for(failure: CliError) -> NoReturn:
    _exit(failure.status, failure.line())


def _exit(status: int, line: str) -> NoReturn:
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
