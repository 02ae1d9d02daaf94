"""Processes a test started, found by a marker only they carry (the test's own temporary folder,
in their command line or environment), and stopped by their ids: never by a name, so that other
Ray instances on the machine (other tests', other people's) are left alone."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def marked(marker: str, names: tuple[str, ...] = ()) -> list[int]:
    """Live processes whose command line or environment holds ``marker`` (and, when ``names`` are
    given, whose command line names one of them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            environment = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() not in command + b"\0" + environment or not alive(int(entry.name)):
            continue
        if not names or any(name.encode() in command for name in names):
            found.append(int(entry.name))
    return found


def stop(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is still running after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(alive(pid) for pid in pids):
            time.sleep(0.2)


@pytest.fixture
def ray_tmpdir(monkeypatch):
    """A private RAY_TMPDIR for the test and what it starts: Ray instances started there (and
    their `ray_current_cluster` file) are invisible to other tests' `ray.init()`, and theirs to
    these. Short, under /tmp: Ray's socket paths (at most 107 bytes) live under it. Whatever of the
    test's Ray instances is still running at the end is stopped, by process id."""
    folder = Path(tempfile.mkdtemp(prefix="itlray-", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(folder))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield folder
    stop(marked(str(folder)))
    shutil.rmtree(folder, ignore_errors=True)
