"""Writing files so that a reader never sees half of one: a temporary file beside the target,
renamed over it when complete (``os.replace`` is atomic within one file system).

Every stage that leaves a result on disk (checkpoints, stage results, shards, manifests, label
sets, reports) writes through here, so a crash or a kill at any moment leaves either the old file
or the new one, never a torn one, and no temporary file behind when the writer fails.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on a clean exit it replaces ``path``
    (with permissions ``mode``), on an exception it is removed and the exception goes on.

    The temporary name is ``.<name>.tmp`` in the same folder (hidden, and on the same file system
    as the target, so the rename is atomic). The folder must exist. Raises ``OSError`` from the
    writer or the rename (a full or read-only disk)."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        yield temporary
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomically(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically."""
    with atomic_path(path) as temporary:
        if isinstance(data, str):
            temporary.write_text(data, encoding="utf-8")
        else:
            temporary.write_bytes(data)


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as indented, key-sorted JSON to ``path`` atomically."""
    write_atomically(path, json.dumps(value, indent=1, sort_keys=True) + "\n")
