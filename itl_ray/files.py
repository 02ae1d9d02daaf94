"""Writing files so that a reader never sees half of one: a temporary file beside the target,
renamed over it when complete (``os.replace`` is atomic within one file system).

Every stage that leaves a result on disk (checkpoints, stage results, shards, manifests, label
sets, reports) writes through here, so a crash or a kill at any moment leaves either the old file
or the new one, never a torn one, and no temporary file behind when the writer fails.
"""

from __future__ import annotations

import contextlib
import errno
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


# Errors of a disk a user must fix (full, read-only, not ours to write), not bugs of the program.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR})


def disk_error(error: BaseException) -> OSError | None:
    """The first OSError with one of ``DISK_ERRNOS`` in ``error``'s chain of causes and contexts
    (itself included), or None: a full, read-only or forbidden disk behind whatever wrapped it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
            return error
        error = error.__cause__ or error.__context__
    return None


def describe_disk_error(error: OSError, where: str | Path = "a file") -> str:
    """``<path>: <reason>`` of a disk error, e.g. ``/data/runs/x: No space left on device``;
    ``where`` stands for the path when the error names none."""
    reason = os.strerror(error.errno) if error.errno else str(error)  # pyarrow's strerror is a paragraph
    return f"{error.filename if error.filename is not None else where}: {reason}"


def check_writable(folder: str | Path, what: str) -> None:
    """Find out, before any work starts, whether ``folder`` can be written: write, sync and remove a
    small file in it, or where it does not exist yet in its nearest existing parent (the folder is
    not made: a check that refuses leaves nothing behind). Raises UserError naming ``what``, the
    path and the reason for a read-only, full or forbidden disk, or a parent that is a file."""
    from itl_ray.errors import UserError

    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    probe = existing / f".write-check-{os.getpid()}"
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        try:
            with open(probe, "wb") as handle:
                handle.write(b"\0" * 4096)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as error:
        where = Path(error.filename) if error.filename is not None else existing
        at = "" if where == folder else f" ({where})"
        remedy = "free space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable"
        raise UserError(f"cannot write {what} {folder}: {error.strerror or error}{at}; {remedy} or choose "
                        "another folder") from None
