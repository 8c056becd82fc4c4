"""Servers in their own processes, for tests that must survive, cause or watch a crash."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent


def server_env(workdir: Path, **settings: str) -> dict[str, str]:
    """An environment for a server under ``workdir``: its own database, artifacts and port file.

    Inherited ``SARTIQ_*`` variables are dropped so the caller's shell cannot leak in;
    ``settings`` are added as ``SARTIQ_<NAME>`` (use ``__`` for nesting).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARTIQ_")}
    env.update(
        SARTIQ_SERVER__PORT="0",
        SARTIQ_SERVER__PORT_FILE=str(workdir / "port"),
        SARTIQ_SERVER__GRACE_PERIOD="1",
        SARTIQ_DATABASE__URL=f"sqlite+aiosqlite:///{workdir / 'sartiq.db'}",
        SARTIQ_MEDIA__ARTIFACT_DIR=str(workdir / "artifacts"),
        PYTHONFAULTHANDLER="1",
    )
    env.update({f"SARTIQ_{name.upper()}": value for name, value in settings.items()})
    return env


@dataclass(frozen=True)
class Finished:
    """A process that ran to its end."""

    returncode: int
    stdout: str
    stderr: str


async def run_process(
    argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 60.0
) -> Finished:
    """Run a command to its end without blocking the event loop."""
    process = await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()  # a command that never ends must not outlive the test
        await process.wait()
        raise
    code = process.returncode if process.returncode is not None else -1
    return Finished(code, out.decode(errors="replace"), err.decode(errors="replace"))


class ServerProcess:
    """One server process: started, waited on until it serves, killed or stopped.

    Its stderr (JSON logs, or a fault handler's traceback) goes to ``log_path``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        workdir: Path,
        *,
        port_variable: str = "SARTIQ_SERVER__PORT_FILE",
        log_name: str = "server.log",
    ) -> None:
        self.argv = list(argv)
        self.env = env
        self.workdir = workdir
        self.port_file = Path(env[port_variable])
        self.log_path = workdir / log_name
        self.process: asyncio.subprocess.Process | None = None
        self.port = 0

    @classmethod
    def service(cls, workdir: Path, **settings: str) -> ServerProcess:
        """The real service entry point, ``python -m server``."""
        return cls([sys.executable, "-m", "server"], server_env(workdir, **settings), workdir)

    @classmethod
    def with_fake_compute(cls, workdir: Path, *, hold: bool, **settings: str) -> ServerProcess:
        """The service with the scriptable fake compute backend (``tests/fake_server.py``)."""
        argv = [sys.executable, str(TESTS_DIR / "fake_server.py"), "hold" if hold else "instant"]
        return cls(argv, server_env(workdir, **settings), workdir)

    @classmethod
    def compute_server(cls, workdir: Path, *, port: int = 0, **settings: str) -> ServerProcess:
        """The project's compute server, ``python -m server.compute.server``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SARTIQ_")}
        env.update(
            SARTIQ_COMPUTE_SERVER__PORT=str(port),
            SARTIQ_COMPUTE_SERVER__PORT_FILE=str(workdir / "compute.port"),
            PYTHONFAULTHANDLER="1",
        )
        env.update({f"SARTIQ_COMPUTE_SERVER__{k.upper()}": v for k, v in settings.items()})
        return cls(
            [sys.executable, "-m", "server.compute.server"],
            env,
            workdir,
            port_variable="SARTIQ_COMPUTE_SERVER__PORT_FILE",
            log_name="compute.log",
        )

    @contextmanager
    def running(self, timeout: float = 60.0) -> Iterator[int]:
        """Run the process for a ``with`` block (blocking: for session and module fixtures).

        Yields its port once it serves; terminates it afterwards.

        Raises:
            AssertionError: it exited or did not serve within ``timeout`` seconds.
        """
        self.port_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + timeout
            while not self.port_file.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start:\n{self.log_tail()}")
                time.sleep(0.02)  # polling for the port file, not waiting on a guess
            self.port = int(self.port_file.read_text())
            yield self.port
        finally:
            process.terminate()
            process.wait(30)

    @property
    def url(self) -> str:
        """The base URL of a running HTTP server."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        """host:port of the running server."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The process id."""
        if self.process is None:
            raise RuntimeError("not started")
        return self.process.pid

    async def spawn(self) -> None:
        """Start the process without waiting for it to serve."""
        self.port_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=log
            )

    async def start(self, timeout: float = 60.0) -> int:
        """Start the process and wait until it serves; returns its port.

        Raises:
            AssertionError: it exited or did not serve within ``timeout`` seconds.
        """
        await self.spawn()
        await self.wait_serving(timeout)
        return self.port

    async def wait_serving(self, timeout: float = 60.0) -> None:
        """Wait for the port file the server writes once it serves."""
        deadline = time.monotonic() + timeout
        while not self.port_file.exists():
            if self.returncode is not None:
                raise AssertionError(f"server exited with {self.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not serve within {timeout} s:\n{self.log_tail()}")
            await asyncio.sleep(0.02)
        self.port = int(self.port_file.read_text())

    @property
    def returncode(self) -> int | None:
        """The exit status once the process ended (negative: killed by that signal)."""
        return None if self.process is None else self.process.returncode

    async def wait_exit(self) -> int:
        """Wait until the process ends by itself; returns its status."""
        if self.process is None:
            raise RuntimeError("not started")
        return await self.process.wait()

    async def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM the process, wait for a graceful exit, and return its status."""
        if self.process is None:
            raise RuntimeError("not started")
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout)
            except TimeoutError:
                await self.kill()
        return self.process.returncode if self.process.returncode is not None else -1

    def log_tail(self, lines: int = 40) -> str:
        """The last lines the server wrote to stderr."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
