"""The ``sartiq`` command line's arguments: global options and one subcommand per action."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, NoReturn

from sartiq_grpc.cli_failures import EXIT_STATUS_HELP, EXIT_USAGE, one_line

DEFAULT_CONNECT_TIMEOUT = 10.0
STRATEGY_COMMANDS = ("edit", "refine", "video", "background", "adjust", "face-fix")
ENTITY_COMMANDS = ("subject", "product", "style")
DESCRIPTION = """\
The sartiq command line: uploads, catalog entries, generations, watching, downloads.

Everything goes over gRPC, so it works from any machine that reaches the server:
--target host:port (or SARTIQ_TARGET) and --api-key (or SARTIQ_API_KEY).
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line like every other failure (exit 2)."""

    def error(self, message: str) -> NoReturn:
        """Print ``sartiq: usage: <message>`` and exit 2."""
        line = one_line(f"sartiq: usage: {message} (see: {self.prog} --help)")
        self.exit(EXIT_USAGE, line + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``sartiq`` argument parser, every subcommand included."""
    parser = _Parser(
        prog="sartiq",
        description=DESCRIPTION,
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("SARTIQ_TARGET", "127.0.0.1:50051"),
        help="host:port, or dns:///host:port to spread calls over every address of the name",
    )
    parser.add_argument("--api-key", default=os.environ.get("SARTIQ_API_KEY", ""))
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=float(os.environ.get("SARTIQ_CONNECT_TIMEOUT", DEFAULT_CONNECT_TIMEOUT)),
        metavar="SECONDS",
        help="how long to wait for the server to accept a connection, and for a watch to "
        "reconnect, before giving up with exit status 5 (default %(default)g; "
        "SARTIQ_CONNECT_TIMEOUT)",
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    parser.add_argument("--ca-file", help="PEM roots to trust (implies --tls)")
    parser.add_argument("--cert-file", help="client certificate, for mutual TLS")
    parser.add_argument("--key-file", help="client key, for mutual TLS")
    commands = parser.add_subparsers(dest="command", required=True)
    upload = commands.add_parser("upload", help="upload an image; prints artifact:<sha256>")
    upload.add_argument("file", help="a local image file")
    for kind in ENTITY_COMMANDS:
        sub = commands.add_parser(kind, help=f"create a {kind} from image files; prints its id")
        sub.add_argument("name")
        sub.add_argument("--description", default="")
        sub.add_argument("--image", action="append", default=[], help="a local image file")
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
    "(prediction:<id>, artifact:<sha256>, file:///path on the server, http(s)://...; "
    "the scheme in any case; ./ names a local file that looks like a reference)"
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
