"""Named points where a trial can be held, so that a fault test injects its fault at a moment it
controls instead of racing the clock.

Armed only by the environment variable ``ITL_RAY_BARRIERS`` (a folder every process of the test
sees: the trial's, the driver's, the test's). Unset, ``reach`` returns at once and nothing else
changes. Armed, a process that reaches point ``name``

1. writes ``<folder>/<name>.reached`` (so the test knows the point was passed, and by which pid);
2. if ``<folder>/<name>.hold`` exists, waits there until that file is removed.

The test arms a point with ``hold(folder, name)`` before starting the sweep, waits with
``reached(folder, name)``, injects its fault (removes a node, kills or signals the driver) while
the trial waits, then calls ``release(folder, name)`` (or lets the fault end the waiting process).
A point passed again (a retried trial) writes ``.reached`` again and waits again only if the
test has armed it again. Names are file names: ``<trial_id>.<point>``, e.g.
``3f2a9c01b7de.pretrain-epoch-3`` (``trial.run_trial`` names its points).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

ENVIRONMENT = "ITL_RAY_BARRIERS"  # the folder of the barrier files; unset: no barrier anywhere
POLL_SECONDS = 0.05


def _folder() -> Path | None:
    folder = os.environ.get(ENVIRONMENT)
    return Path(folder) if folder else None


def reach(name: str, log: Callable[[str], None] = print) -> None:
    """Pass the point ``name``: nothing when unarmed; else record it and wait while it is held."""
    folder = _folder()
    if folder is None:
        return
    held = folder / f"{name}.hold"
    marker = folder / f"{name}.reached"
    temporary = marker.with_name(f".{marker.name}.{os.getpid()}")
    temporary.write_text(f"{os.getpid()}\n")
    os.replace(temporary, marker)  # the test never sees half a marker
    if held.exists():
        log(f"held at {name}")
        while held.exists():
            time.sleep(POLL_SECONDS)
        log(f"released at {name}")


def hold(folder: str | Path, name: str) -> None:
    """Arm ``name``: the next process to reach it waits until ``release``. Clears an earlier
    ``.reached`` marker of that name."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"{name}.reached").unlink(missing_ok=True)
    (Path(folder) / f"{name}.hold").touch()


def release(folder: str | Path, name: str) -> None:
    """Let whoever waits at ``name`` go on (and later arrivals pass)."""
    (Path(folder) / f"{name}.hold").unlink(missing_ok=True)


def reached(folder: str | Path, name: str) -> int | None:
    """The pid of the process that last reached ``name``, or None while none has."""
    try:
        return int((Path(folder) / f"{name}.reached").read_text())
    except (FileNotFoundError, ValueError):
        return None
