"""Content-addressed artifact files: atomic writes, and no stale temporary file survives."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import make_settings

from server.app import App
from server.compute.fake import FakeComputeBackend
from server.media.artifacts import FileArtifactStore


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _temp(root: Path, name: str, *, age: float = 0.0, directory: str = "ab") -> Path:
    path = root / directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"partial")
    if age:
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))
    return path


def test_sweep_removes_what_no_writer_will_finish(tmp_path: Path) -> None:
    store = FileArtifactStore(tmp_path)
    host = socket.gethostname()
    stored = store.put_sync(b"kept", "image/png")
    killed = _temp(tmp_path, f".tmp-{host}-{_dead_pid()}-abcd1234")
    legacy = _temp(tmp_path, ".tmp-k2j3h4g5")
    writing = _temp(tmp_path, f".tmp-{host}-{os.getpid()}-abcd1234")
    elsewhere = _temp(tmp_path, ".tmp-other-host-42-abcd1234")
    abandoned = _temp(tmp_path, ".tmp-other-host-43-abcd1234", age=7200)

    assert store.sweep_temporary(max_age=3600) == 3

    assert not killed.exists()
    assert not legacy.exists()
    assert not abandoned.exists()
    assert writing.exists()
    assert elsewhere.exists()
    assert store.find_sync(stored.sha256).read_bytes() == b"kept"


async def test_start_removes_stale_temporary_files(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    host = socket.gethostname()
    stale = _temp(settings.media.artifact_dir, f".tmp-{host}-{_dead_pid()}-abcd1234")
    # An upload a killed process was receiving.
    upload = _temp(
        settings.media.artifact_dir, f".tmp-{host}-{_dead_pid()}-ef56", directory="incoming"
    )
    async with App(settings, compute=FakeComputeBackend()):
        assert not stale.exists()
        assert not upload.exists()
