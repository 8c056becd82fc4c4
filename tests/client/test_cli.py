"""The ``sartiq`` CLI as a user runs it, against a real server, and how it fails.

Every subcommand runs as a process (``python -m sartiq_grpc.cli``) with a missing file,
a directory, an unreadable file, an unreachable server and a bad key: each must end with
one line on stderr naming the file or server, the documented exit status, and no
traceback. The runs of one case go in parallel, so the whole matrix takes seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import socket
import sys
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_settings
from helpers import assert_eventually, png_bytes
from PIL import Image

from sartiq_grpc.cli_parser import build_parser
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ApiKey, AuthSettings

ROOT = Path(__file__).resolve().parents[2]
GENERATION_ID = str(uuid.UUID(int=7))
KEY = "the-right-key-for-org-one-0123"
CONNECT_TIMEOUT = "1.5"  # above the CLI's quiet half second, so the notice shows
_LIMITS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)

# Each subcommand, given an image argument. Those that take no file get the bad file as
# --ca-file instead: every subcommand reads at least that one.
FILE_COMMANDS: dict[str, Callable[[str], list[str]]] = {
    "upload": lambda f: ["upload", f],
    "subject": lambda f: ["subject", "Ana", "--image", f],
    "product": lambda f: ["product", "Dress", "--image", f],
    "style": lambda f: ["style", "Studio", "--image", f],
    "edit": lambda f: ["edit", f, "--tool", "EDIT", "--prompt", "warmer"],
    "refine": lambda f: ["refine", f],
    "video": lambda f: ["video", f],
    "background": lambda f: ["background", f, "--prompt", "white"],
    "adjust": lambda f: ["adjust", f, "--brightness", "0.2"],
    "face-fix": lambda f: ["face-fix", f],
}
PLAIN_COMMANDS: dict[str, list[str]] = {
    "generate": ["generate", "--product", "p", "--shot", "front"],
    "get": ["get", GENERATION_ID],
    "cancel": ["cancel", GENERATION_ID],
    "watch": ["watch", GENERATION_ID],
    "ref": ["ref", GENERATION_ID],
    "outputs": ["outputs", GENERATION_ID, "--dir", "unused-out"],
    "list": ["list"],
    "capabilities": ["capabilities"],
    "health": ["health"],
}


@dataclass(frozen=True)
class Run:
    """One finished CLI process."""

    argv: list[str]
    status: int
    stdout: str
    stderr: str


async def sartiq(*args: str, cwd: Path = ROOT) -> Run:
    """Run the CLI to its end, with no SARTIQ_* variables inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARTIQ_")}
    # At most 8 at once: each is a Python process, and this machine is small.
    limit = _LIMITS.setdefault(asyncio.get_running_loop(), asyncio.Semaphore(8))
    async with limit:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sartiq_grpc.cli",
            *args,
            cwd=cwd,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 45)
    assert process.returncode is not None
    return Run(list(args), process.returncode, out.decode(), err.decode())


def failure_problems(run: Run, status: int, *needles: str) -> list[str]:
    """What is wrong with a failure: not one line naming ``needles``, another status."""
    problems = []
    if "Traceback" in run.stdout + run.stderr:
        problems.append("a traceback")
    if run.status != status:
        problems.append(f"exit {run.status}, not {status}")
    lines = run.stderr.splitlines()
    if len(lines) != 1 or not lines[0].startswith("sartiq: "):
        problems.append(f"not one 'sartiq: ' line on stderr: {run.stderr!r}")
    problems += [
        f"{needle!r} not named in {run.stderr!r}" for needle in needles if needle not in run.stderr
    ]
    return problems


async def every_subcommand(argv: Callable[[str], list[str]]) -> dict[str, Run]:
    """Run the CLI with ``argv(command)`` for every subcommand at once, by command."""
    names = [*FILE_COMMANDS, *PLAIN_COMMANDS]
    runs = await asyncio.gather(*(sartiq(*argv(name)) for name in names))
    return dict(zip(names, runs, strict=True))


def args_of(name: str, image: str) -> list[str]:
    """The subcommand's arguments, with ``image`` where it takes a file."""
    return FILE_COMMANDS[name](image) if name in FILE_COMMANDS else PLAIN_COMMANDS[name]


def assert_all(problems: dict[str, list[str]]) -> None:
    bad = {name: found for name, found in problems.items() if found}
    assert not bad, "\n".join(f"sartiq {name}: {'; '.join(found)}" for name, found in bad.items())


def closed_port() -> int:
    """A local port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_bad_file(name: str, path: str, target: str) -> list[str]:
    """The subcommand with ``path`` as its file (or as --ca-file), against ``target``."""
    head = ["--target", target, "--connect-timeout", "0.2"]
    if name in FILE_COMMANDS:
        return [*head, *FILE_COMMANDS[name](path)]
    return [*head, "--ca-file", path, *PLAIN_COMMANDS[name]]


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "look.png"
    path.write_bytes(png_bytes((200, 40, 40)))
    return str(path)


def test_the_matrix_covers_every_subcommand() -> None:
    parser = build_parser()
    [commands] = [a for a in parser._actions if a.dest == "command"]
    assert set(commands.choices or {}) == {*FILE_COMMANDS, *PLAIN_COMMANDS}


def test_help_documents_the_exit_statuses() -> None:
    text = build_parser().format_help()
    for status in ("1 ", "2 ", "3 ", "4 ", "5 "):
        assert f"\n  {status}" in text
    assert "--connect-timeout" in text


@pytest.mark.parametrize("kind", ["missing", "directory", "unreadable"])
async def test_a_bad_local_file_is_one_line_and_exit_2(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "input.png"
    why = {
        "missing": "no such file",
        "directory": "is a directory",
        "unreadable": "permission denied",
    }[kind]
    if kind == "directory":
        path.mkdir()
    elif kind == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads every file: an unreadable file cannot be made")
        path.write_bytes(png_bytes((1, 2, 3)))
        path.chmod(0)
    # Nothing listens at the target: the file must be checked before any connection.
    target = f"127.0.0.1:{closed_port()}"
    runs = await every_subcommand(lambda name: with_bad_file(name, str(path), target))
    assert_all({name: failure_problems(run, 2, str(path), why) for name, run in runs.items()})


async def test_an_unreachable_server_is_waited_for_within_the_bound_then_exit_5(
    image: str,
) -> None:
    target = f"127.0.0.1:{closed_port()}"

    head = ["--target", target, "--connect-timeout", CONNECT_TIMEOUT]
    runs = await every_subcommand(lambda name: [*head, *args_of(name, image)])
    # One line: the notice that it waits, and for how long, then why it gave up.
    needles = (target, f"waiting up to {CONNECT_TIMEOUT} s", "gave up: Connection refused")
    assert_all({name: failure_problems(run, 5, *needles) for name, run in runs.items()})


def read_terminal(fd: int, until: bytes, timeout: float) -> bytes:
    """What a pseudo-terminal shows until ``until`` appears, it closes, or ``timeout``."""
    seen = b""
    deadline = time.monotonic() + timeout
    while until not in seen and (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        seen += chunk
    return seen


async def test_on_a_terminal_the_wait_shows_while_it_lasts() -> None:
    target = f"127.0.0.1:{closed_port()}"
    primary, secondary = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sartiq_grpc.cli",
            "--target",
            target,
            "--connect-timeout",
            "6",
            "watch",
            GENERATION_ID,
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("SARTIQ_")},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=secondary,  # a terminal: the notice shows at once, not only at the end
        )
        os.close(secondary)
        notice = f"sartiq: {target}: waiting up to 6 s for the server".encode()
        shown = await asyncio.to_thread(read_terminal, primary, notice, 30)
        assert notice in shown, shown
        # Shown while it still waits: the outcome comes seconds later, not with it.
        assert b"gave up" not in shown, shown
        rest = await asyncio.to_thread(read_terminal, primary, b"\n", 30)
        await asyncio.wait_for(process.wait(), 30)
    finally:
        os.close(primary)
    text = (shown + rest).decode()
    assert process.returncode == 5, text
    assert "Traceback" not in text
    assert text.strip().endswith("gave up: Connection refused"), text


@pytest.fixture
async def keyed_server(tmp_path: Path) -> AsyncIterator[str]:
    keys = (ApiKey(organization="org-one", key=KEY),)
    settings = make_settings(tmp_path).model_copy(update={"auth": AuthSettings(api_keys=keys)})
    async with App(settings, compute=FakeComputeBackend()) as app:
        yield f"127.0.0.1:{app.port}"


async def test_a_bad_key_is_one_line_and_exit_4(keyed_server: str, image: str) -> None:
    head = ["--target", keyed_server, "--api-key", "not-the-key"]
    runs = await every_subcommand(lambda name: [*head, *args_of(name, image)])
    health = runs.pop("health")  # the health service needs no key
    assert (health.status, health.stdout.strip(), health.stderr) == (0, "SERVING", "")
    needles = (keyed_server, "UNAUTHENTICATED", "--api-key")
    assert_all({name: failure_problems(run, 4, *needles) for name, run in runs.items()})


async def test_a_usage_error_is_one_line_and_exit_2() -> None:
    run = await sartiq("generate", "--product", "p")  # --shot is required
    assert failure_problems(run, 2, "usage:", "--shot", "sartiq generate --help") == []


async def test_the_server_refusals_name_the_field_or_id(app: App, image: str) -> None:
    target = ("--target", f"127.0.0.1:{app.port}")
    invalid, unknown, enhance, loopback, huge = await asyncio.gather(
        # More faults than the status message lists: the line names each, and why.
        sartiq(
            *target, "generate", "--shot", "f", "--width", "65", "--height", "9000", "--batch", "17"
        ),
        sartiq(*target, "get", GENERATION_ID),
        sartiq(*target, "edit", image, "--tool", "PRODUCT_ENHANCEMENT"),
        # A URL with its scheme in capitals is a URL (here one the server refuses).
        sartiq(*target, "refine", "HTTP://127.0.0.1/a.png"),
        # A number no int32 field can hold: a usage failure, not a traceback.
        sartiq(*target, "video", image, "--fps", "99999999999"),
    )
    assert_all(
        {
            "generate": failure_problems(
                invalid,
                2,
                "params.width: ",
                "params.height: ",
                "params.batch_size: ",
                "params.subject_id: ",
                "params.product_id: ",
                "multiple of 8",
            ),
            "get": failure_problems(unknown, 3, f"generation_id={GENERATION_ID}"),
            "edit": failure_problems(enhance, 2, "params.product_id"),
            "refine": failure_problems(loopback, 2, "params.base_image_url"),
            "video": failure_problems(huge, 2, "arguments", "out of range"),
        }
    )


async def test_a_capitalised_scheme_is_a_reference_not_a_path(app: App, image: str) -> None:
    target = ("--target", f"127.0.0.1:{app.port}")
    uploaded = await sartiq(*target, "upload", image)
    assert uploaded.status == 0, uploaded.stderr
    reference = uploaded.stdout.strip().replace("artifact:", "ARTIFACT:")
    created = await sartiq(*target, "refine", reference, "--factor", "2")
    assert created.status == 0, created.stderr
    shown = await sartiq(*target, "get", created.stdout.strip())
    params = json.loads(shown.stdout)["refine"]
    assert params["baseImageUrl"] == reference.lower()  # sent in canonical form


async def test_watch_says_it_reconnects_and_gives_up_after_the_bound(
    tmp_path: Path, image: str
) -> None:
    compute = FakeComputeBackend()
    compute.hold = True
    async with App(make_settings(tmp_path), compute=compute) as app:
        target = f"127.0.0.1:{app.port}"
        created = await sartiq("--target", target, "adjust", image, "--brightness", "0.2")
        assert created.status == 0, created.stderr
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sartiq_grpc.cli",
            "--target",
            target,
            "--connect-timeout",
            CONNECT_TIMEOUT,
            "watch",
            created.stdout.strip(),
            "--json",
            cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("SARTIQ_")},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stdout is not None
        first = json.loads(await asyncio.wait_for(process.stdout.readline(), 30))
        assert first["kind"] == "EVENT_KIND_GENERATION_CREATED"

        async def submitted() -> bool:
            return bool(compute.tasks)

        await assert_eventually(submitted)
    # The server is gone while the generation is held: the watch must say so and stop.
    _, err = await asyncio.wait_for(process.communicate(), 30)
    stderr = err.decode()
    lines = stderr.splitlines()
    assert process.returncode == 5, stderr
    assert "Traceback" not in stderr
    assert any("reconnecting for up to" in line for line in lines[:-1]), stderr
    assert lines[-1].startswith(f"sartiq: {target}: the server stayed unreachable for 1.5 s")


async def test_tour(app: App, tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scripts.demo_images",
        str(demo),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
    )
    assert await process.wait() == 0
    target = ("--target", f"127.0.0.1:{app.port}")

    async def ok(*args: str) -> str:
        run = await sartiq(*target, *args)
        assert run.status == 0, run.stderr
        return run.stdout.strip()

    subject = await ok("subject", "Ana", "--image", str(demo / "model.png"))
    product = await ok("product", "Dress", "--image", str(demo / "dress.png"))
    generation = await ok(
        "generate",
        "--subject",
        subject,
        "--product",
        product,
        "--shot",
        "full-body front",
        "--batch",
        "2",
        "--width",
        "128",
        "--height",
        "192",
    )
    events = [json.loads(line) for line in (await ok("watch", generation, "--json")).splitlines()]
    assert [e["sequence"] for e in events] == [str(n) for n in range(1, len(events) + 1)]
    assert events[0]["kind"] == "EVENT_KIND_GENERATION_CREATED"
    assert events[-1]["terminal"]
    summary = (await ok("watch", generation)).splitlines()
    assert f"{generation} COMPLETED" in summary
    assert sum(": artifact:" in line for line in summary) == 2
    # Downloaded over gRPC into a directory of the client's choosing: no server paths.
    downloads = tmp_path / "downloads"
    outputs = (await ok("outputs", generation, "--dir", str(downloads))).splitlines()
    assert len(outputs) == 2
    for path in outputs:
        assert Path(path).parent == downloads
        with Image.open(path) as image:
            assert image.size == (128, 192)
    assert generation in await ok("list")
    assert await ok("health") == "SERVING"
