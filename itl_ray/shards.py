"""Prepared datasets on disk: pyarrow shards of decode-ready JPEGs plus a manifest, read by row.

A prepared folder (written by ``itl_ray.prepare``) holds::

    PREPARED.json      kind, settings, source, counts: written last, so its presence means complete
    plan.json          the same identity, written first: an interrupted preparation resumes from it
    manifest.parquet   one row per image: split, label, source path, boxes, sizes, checksum, shard, offset
    report.json        images per split and class, skipped files and why
    shards/shard-NNNNN.arrow   Arrow IPC files with columns item, jpeg, sizes, sha256

Every stored image is a baseline RGB JPEG (grayscale, CMYK and PNG sources are re-encoded), so
one decoder (nvjpeg on a GPU, libjpeg on a CPU) reads all of them. Trials never copy images: a
subset is a list of manifest rows, and ``Prepared.read`` fetches those rows' bytes from
memory-mapped shards.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from itl_ray.errors import UserError
from itl_ray.files import atomic_path

FORMAT_VERSION = 1
KINDS = ("imagenet", "voc2007", "voc2012-action", "sun397")
INFO, PLAN, MANIFEST, REPORT, SHARDS = "PREPARED.json", "plan.json", "manifest.parquet", "report.json", "shards"

# Columns of a shard file; the manifest repeats all but ``jpeg`` and adds the item's metadata.
SHARD_SCHEMA = pa.schema([
    ("item", pa.int64()),  # the item's number in the validated plan
    ("jpeg", pa.binary()),
    ("width", pa.int32()), ("height", pa.int32()),  # stored size
    ("source_width", pa.int32()), ("source_height", pa.int32()),
    ("sha256", pa.string()),  # of the source file's bytes
])


def shard_path(folder: Path, index: int) -> Path:
    """Path of shard ``index`` in the prepared folder ``folder``: ``shards/shard-NNNNN.arrow``."""
    return folder / SHARDS / f"shard-{index:05d}.arrow"


def write_shard(path: Path, columns: dict[str, list], skipped: list[dict]) -> None:
    """One shard file (Arrow IPC, SHARD_SCHEMA's columns, one list per column), written atomically
    (``files.atomic_path``); ``skipped`` (files that could not be used, and why) rides in its schema
    metadata so a resumed preparation still reports them."""
    schema = SHARD_SCHEMA.with_metadata({"skipped": json.dumps(skipped)})
    table = pa.table(columns, schema=schema)
    with atomic_path(path) as temporary:
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table)


def read_shard(path: Path) -> pa.Table:
    """A shard file, memory-mapped (its JPEG bytes are not read until used)."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def shard_skipped(table: pa.Table) -> list[dict]:
    """The source files its preparation skipped (``{"source", "reason"}`` each), from a shard's
    schema metadata (see ``write_shard``)."""
    return json.loads((table.schema.metadata or {}).get(b"skipped", b"[]"))


class Prepared:
    """An opened prepared dataset: its manifest, and its images read by manifest row."""

    def __init__(self, folder: str | Path, kind: str, setting: str = ""):
        self.folder = Path(folder).expanduser().resolve()
        where = f"{setting}={folder}" if setting else str(folder)
        info_file = self.folder / INFO
        if not info_file.is_file():
            if (self.folder / PLAN).is_file():
                raise UserError(f"{where}: its preparation did not finish; rerun `itl-ray prepare {kind} ROOT "
                                f"{folder}` to complete it")
            if self.folder.is_dir():
                raise UserError(f"{where} is not a prepared dataset; run `itl-ray prepare {kind} ROOT OUT` and "
                                "point the setting at OUT")
            raise UserError(f"{where} does not exist; run `itl-ray prepare {kind} ROOT OUT` and point the "
                            "setting at OUT")
        self.info = json.loads(info_file.read_text())
        if self.info.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{where} was prepared by another itl_ray version; prepare it again")
        if self.info.get("kind") != kind:
            raise UserError(f"{where} holds a prepared {self.info.get('kind')} dataset, not {kind}")
        self.manifest = pq.read_table(self.folder / MANIFEST)
        self._shard = self.manifest.column("shard").to_numpy()
        self._offset = self.manifest.column("offset").to_numpy()
        self._jpegs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> (byte offsets, bytes)
        self._lock = threading.Lock()  # decode threads read concurrently

    def __len__(self) -> int:
        return self.manifest.num_rows

    def column(self, name: str) -> list:
        """Manifest column ``name`` as a Python list, one value per row (KeyError for no such column)."""
        return self.manifest.column(name).to_pylist()

    def rows_in(self, split: str) -> np.ndarray:
        """Manifest rows whose comma-separated ``split`` field names ``split``."""
        return np.array([row for row, splits in enumerate(self.column("split")) if split in splits.split(",")],
                        dtype=np.int64)

    def _jpeg_column(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """A shard's JPEG column as (start offsets, all bytes), viewing the memory-mapped file."""
        with self._lock:
            if shard not in self._jpegs:
                jpeg = read_shard(shard_path(self.folder, shard)).column("jpeg")
                array = jpeg.chunk(0) if jpeg.num_chunks == 1 else jpeg.combine_chunks()
                _, offsets, values = array.buffers()
                kind = np.int64 if pa.types.is_large_binary(array.type) else np.int32
                starts = np.frombuffer(offsets, dtype=kind)[array.offset : array.offset + len(array) + 1]
                self._jpegs[shard] = (starts, np.frombuffer(values, dtype=np.uint8))
            return self._jpegs[shard]

    def views(self, rows: Sequence[int]) -> list[np.ndarray]:
        """The JPEG bytes of manifest ``rows`` as read-only uint8 arrays over the shard files (no copy)."""
        out = []
        for row in rows:
            starts, values = self._jpeg_column(int(self._shard[row]))
            offset = self._offset[row]
            out.append(values[starts[offset] : starts[offset + 1]])
        return out

    def read(self, rows: Sequence[int]) -> list[bytes]:
        """The JPEG bytes of manifest ``rows``, in the order given."""
        return [view.tobytes() for view in self.views(rows)]


# The `itl-ray prepare` kind that each of the config's ``data`` settings expects.
PREPARE_KINDS = {"imagenet": "imagenet", "voc2007": "voc2007", "voc2012": "voc2012-action", "sun397": "sun397"}


def prepared_paths(shards_dir: str | Path) -> dict[str, str]:
    """Where the four prepared datasets lie under one folder of shards, keyed by the config's
    ``data`` setting: ``{"imagenet": "<shards_dir>/imagenet", ..., "voc2012":
    "<shards_dir>/voc2012-action", ...}`` (one sub-folder per ``itl-ray prepare`` kind, the layout
    `make demo` writes). Pure path arithmetic: nothing is checked or created."""
    return {setting: str(Path(shards_dir) / kind) for setting, kind in PREPARE_KINDS.items()}
