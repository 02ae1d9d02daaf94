"""Prepared datasets on disk: pyarrow shards of decode-ready JPEGs plus a manifest, read by row.

A prepared folder (written by ``itl_ray.prepare``) holds::

    PREPARED.json      kind, settings, source, counts, each shard's size in bytes and the content
                       hash (``content_hash``): written last, so its presence means complete
    plan.json          the same identity, written first: an interrupted preparation resumes from it
    manifest.parquet   one row per image: split, label, source path, boxes, sizes, checksum, shard, offset
    report.json        images per split and class, skipped files and why, annotation fixes,
                       (VOC 2007) proposal counts and recall
    shards/shard-NNNNN.arrow   Arrow IPC files with columns item, jpeg, sizes, sha256
    proposals/proposals-NNNNN.arrow   (VOC 2007) Selective Search boxes of shard NNNNN's images,
                       row for row: columns item, sha256, boxes

Every stored image is a baseline RGB JPEG (grayscale, CMYK and PNG sources are re-encoded), so
one decoder (nvjpeg on a GPU, libjpeg on a CPU) reads all of them. Trials never copy images: a
subset is a list of manifest rows, and ``Prepared.read`` fetches those rows' bytes from
memory-mapped shards. ``Prepared.proposals(row)`` gives a VOC 2007 image's Selective Search boxes
(computed once by ``itl-ray prepare voc2007``, see ``itl_ray.proposals``), also memory-mapped.

A folder's identity is its content, not its path: ``content_hash`` (16 hex digits) covers the
format version, the kind, the stored size and JPEG quality, and every manifest column but the
storage layout (shard, offset): splits, labels, VOC objects, stored and source sizes and each
source file's SHA-256. ``itl-ray prepare`` records it in PREPARED.json; for a folder prepared
before it did, ``Prepared.content_hash`` computes the same value from the manifest (about a
second for ImageNet) and writes nothing into the folder. ``Prepared.verify`` checks that the
shards are what PREPARED.json and the manifest say, cheaply (footers, schemas, row counts, sizes;
no image bytes read), naming the first file that is not.
"""

from __future__ import annotations

import functools
import hashlib
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
LAYOUT_COLUMNS = ("shard", "offset")  # where a manifest row is stored, not what it holds
PROPOSALS = "proposals"

# Columns of a shard file; the manifest repeats all but ``jpeg`` and adds the item's metadata.
SHARD_SCHEMA = pa.schema([
    ("item", pa.int64()),  # the item's number in the validated plan
    ("jpeg", pa.binary()),
    ("width", pa.int32()), ("height", pa.int32()),  # stored size
    ("source_width", pa.int32()), ("source_height", pa.int32()),
    ("sha256", pa.string()),  # of the source file's bytes
])


# Columns of a proposals file: one row per row of the image shard of the same number, in the same
# order. ``sha256`` repeats the image's source checksum, so boxes are never read for another image.
PROPOSALS_SCHEMA = pa.schema([
    ("item", pa.int64()),  # the image's number in the validated plan
    ("sha256", pa.string()),  # of the image's source file's bytes, as in the shard and manifest
    # Four values per box, x1, y1, x2, y2: 0-based pixel indices of the stored image, both corners
    # inclusive, best box first. uint16 holds every index of a JPEG (at most 65,535 px a side).
    ("boxes", pa.list_(pa.uint16())),
])
RERUN_VOC2007 = "run `itl-ray prepare voc2007 ROOT OUT` again"


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


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def read_info(folder: str | Path, kind: str, setting: str = "") -> dict:
    """PREPARED.json of a prepared folder of ``kind``. UserError, naming ``setting=folder``, for a
    folder that does not exist, is not prepared, did not finish, or holds another kind or format."""
    path = Path(folder).expanduser().resolve()
    where = f"{setting}={folder}" if setting else str(folder)
    info_file = path / INFO
    if not info_file.is_file():
        if (path / PLAN).is_file():
            raise UserError(f"{where}: its preparation did not finish; rerun `itl-ray prepare {kind} ROOT "
                            f"{folder}` to complete it")
        if path.is_dir():
            raise UserError(f"{where} is not a prepared dataset; run `itl-ray prepare {kind} ROOT OUT` and "
                            "point the setting at OUT")
        if path.parent.name == "mini-shards":  # the defaults: the mini-benchmark `make demo` writes
            raise UserError(f"{where} does not exist; `make demo` makes the mini-benchmark there (or point the "
                            f"setting at a folder written by `itl-ray prepare {kind} ROOT OUT`)")
        raise UserError(f"{where} does not exist; run `itl-ray prepare {kind} ROOT OUT` and point the "
                        "setting at OUT")
    try:
        info = json.loads(info_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{where}: {INFO} is not readable ({_first_line(error)}); prepare the dataset again") from None
    if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{where} was prepared by another itl_ray version; prepare it again")
    if info.get("kind") != kind:
        raise UserError(f"{where} holds a prepared {info.get('kind')} dataset, not {kind}")
    return info


def _read_manifest(path: Path, where: str, again: str) -> pa.Table:
    if not path.is_file():
        raise UserError(f"{where}: {MANIFEST} is missing; {again}")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise UserError(f"{where}: {MANIFEST} is not a readable Parquet file ({_first_line(error)}); {again}") from None


def manifest_hash(manifest: pa.Table, info: dict) -> str:
    """The content hash of a prepared folder from its manifest and PREPARED.json (see the module
    docstring): SHA-256 over the format version, kind, stored size and quality (and VOC 2007's
    proposal settings), then each manifest
    column but the layout ones, in name order; 16 hex digits."""
    digest = hashlib.sha256()
    settings = info.get("settings") or {}
    digest.update(json.dumps({"format_version": info.get("format_version"), "kind": info.get("kind"),
                              "short_side": settings.get("short_side"), "quality": settings.get("quality"),
                              **({"proposals": info["proposals"]} if info.get("proposals") else {})},
                             sort_keys=True).encode())
    for name in sorted(manifest.column_names):
        if name in LAYOUT_COLUMNS:
            continue
        column = manifest.column(name)
        digest.update(f"\0{name}\0{column.type}\0".encode())
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            values = column.to_numpy()
            digest.update(values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes())
        else:
            digest.update(json.dumps(column.to_pylist()).encode())
    return digest.hexdigest()[:16]


def proposals_path(folder: Path, index: int) -> Path:
    """Path of the proposals of image shard ``index``: ``proposals/proposals-NNNNN.arrow``."""
    return folder / PROPOSALS / f"proposals-{index:05d}.arrow"


def write_proposals(path: Path, items: Sequence[int], sha256s: Sequence[str], boxes: Sequence[np.ndarray]) -> None:
    """One proposals file (Arrow IPC, PROPOSALS_SCHEMA), written atomically: for each image of an
    image shard, in its order, its plan item, source checksum and boxes (an integer array (K, 4)
    of x1, y1, x2, y2, 0-based inclusive). ValueError for a box outside 0..65535 or not 4 wide."""
    flat = []
    for image_boxes in boxes:
        array = np.asarray(image_boxes).reshape(-1, 4) if np.size(image_boxes) else np.zeros((0, 4), np.int64)
        if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
            raise ValueError("proposal coordinates must lie in 0..65535")
        flat.append(pa.array(array.astype(np.uint16).reshape(-1), type=pa.uint16()))
    offsets = np.concatenate([[0], np.cumsum([len(values) for values in flat])]).astype(np.int32)
    values = pa.concat_arrays(flat) if flat else pa.array([], type=pa.uint16())
    table = pa.table({"item": pa.array(items, type=pa.int64()), "sha256": pa.array(sha256s, type=pa.string()),
                      "boxes": pa.ListArray.from_arrays(pa.array(offsets), values)}, schema=PROPOSALS_SCHEMA)
    with atomic_path(path) as temporary:
        with pa.OSFile(str(temporary), "wb") as sink, pa.ipc.new_file(sink, PROPOSALS_SCHEMA) as writer:
            writer.write_table(table)


def read_proposals(path: Path) -> pa.Table:
    """A proposals file, memory-mapped. pyarrow's ArrowInvalid or OSError when it is not one."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    if not table.schema.equals(PROPOSALS_SCHEMA):
        raise pa.ArrowInvalid(f"{path} does not have the proposals columns")
    return table


class Prepared:
    """An opened prepared dataset: its manifest, and its images read by manifest row."""

    def __init__(self, folder: str | Path, kind: str, setting: str = "", again: str | None = None):
        self.folder = Path(folder).expanduser().resolve()
        self.kind = kind
        self.where = f"{setting}={folder}" if setting else str(folder)
        # What a damaged folder's error tells the user to do (``again``): by default, prepare it anew.
        self._again = again or (f"prepare the dataset again (`itl-ray prepare {kind} ROOT OUT`, OUT a new folder) "
                                f"and point {setting or 'the setting'} at it")
        self.info = read_info(folder, kind, setting)
        self.manifest = _read_manifest(self.folder / MANIFEST, self.where, self._again)
        self._shard = self.manifest.column("shard").to_numpy()
        self._offset = self.manifest.column("offset").to_numpy()
        self._jpegs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> (byte offsets, bytes)
        self._boxes: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # shard -> (value offsets, uint16 values)
        self._lock = threading.Lock()  # decode threads read concurrently

    @functools.cached_property
    def content_hash(self) -> str:
        """16 hex digits identifying what the folder holds (see the module docstring): PREPARED.json's
        ``content_hash``, or computed from the manifest for a folder prepared before it was recorded."""
        return self.info.get("content_hash") or manifest_hash(self.manifest, self.info)

    def verify(self) -> "Prepared":
        """Check that every shard is what PREPARED.json and the manifest say: the file exists, is
        an Arrow IPC file with the shard columns, holds as many rows as the manifest places in it,
        and has the size recorded at preparation (folders that recorded sizes). Reads footers and
        schemas, not image bytes. Returns self; raises UserError naming the first bad file."""
        shards = int(self.info.get("shards", int(self._shard.max()) + 1 if len(self._shard) else 0))
        rows = np.bincount(self._shard, minlength=shards) if len(self._shard) else np.zeros(shards, np.int64)
        if len(rows) > shards:
            raise UserError(f"{self.where}: {MANIFEST} places rows in shard {len(rows) - 1}, but PREPARED.json "
                            f"records {shards} shards; {self._again}")
        sizes = self.info.get("shard_bytes")
        for index in range(shards):
            path = shard_path(self.folder, index)
            name = path.relative_to(self.folder)
            if not path.is_file():
                raise UserError(f"{self.where}: {name} is missing; {self._again}")
            try:
                reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
                stored = sum(reader.get_batch(batch).num_rows for batch in range(reader.num_record_batches))
            except (pa.ArrowInvalid, OSError) as error:
                raise UserError(f"{self.where}: {name} is not a readable Arrow file ({_first_line(error)}); "
                                f"{self._again}") from None
            missing = [column for column in SHARD_SCHEMA.names if column not in reader.schema.names]
            if missing:
                raise UserError(f"{self.where}: {name} lacks the column(s) {', '.join(missing)}; {self._again}")
            if stored != rows[index]:
                raise UserError(f"{self.where}: {name} holds {stored} images, the manifest lists {rows[index]}; "
                                f"{self._again}")
            if sizes is not None and path.stat().st_size != sizes[index]:
                raise UserError(f"{self.where}: {name} has {path.stat().st_size:,} bytes, {sizes[index]:,} when it "
                                f"was prepared (changed since); {self._again}")
        return self

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

    def _proposal_column(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """A proposals file's boxes as (offsets into the values, uint16 values), viewing the
        memory-mapped file, after checking that it belongs to this manifest's images."""
        with self._lock:
            if shard in self._boxes:
                return self._boxes[shard]
            if "proposals" not in self.info:
                raise UserError(f"{self.where} holds no Selective Search proposals (prepared with --no-proposals "
                                f"or before they were stored); {RERUN_VOC2007}, or set "
                                "transfer.detection.proposals: sliding_window")
            path = proposals_path(self.folder, shard)
            try:
                table = read_proposals(path)
            except FileNotFoundError:
                raise UserError(f"{self.where}: {path} is missing; {RERUN_VOC2007}") from None
            except (pa.ArrowInvalid, OSError) as error:
                raise UserError(f"{self.where}: {path} is not a readable proposals file ({error}); "
                                f"{RERUN_VOC2007}") from None
            rows = np.nonzero(self._shard == shard)[0]
            offsets = self._offset[rows]
            stored = table.column("sha256").to_pylist()
            sums = self.manifest.column("sha256")
            if len(rows) and (offsets.max() >= len(stored) or
                              [stored[offset] for offset in offsets] != sums.take(pa.array(rows)).to_pylist()):
                raise UserError(f"{self.where}: {path} holds the proposals of other images than the manifest's; "
                                f"{RERUN_VOC2007}")
            boxes = table.column("boxes")
            array = boxes.chunk(0) if boxes.num_chunks == 1 else boxes.combine_chunks()
            starts = array.offsets.to_numpy(zero_copy_only=False)
            values = array.values.to_numpy(zero_copy_only=False)
            self._boxes[shard] = (starts, values)
            return self._boxes[shard]

    def check_proposals(self) -> None:
        """Check, before a trial needs them, that every image has its proposals: the same one-line
        UserErrors as ``proposals`` (it opens each proposals file once, memory-mapped)."""
        for shard in np.unique(self._shard):
            self._proposal_column(int(shard))

    def proposals(self, row: int) -> np.ndarray:
        """The Selective Search proposals of manifest ``row`` (a prepared VOC 2007 image): float32
        (K, 4), boxes (x1, y1, x2, y2) in 0-based pixel indices of the STORED image with both
        corners inclusive, in Selective Search's order (best first), K <= 2000 (K may be 0 for a
        tiny image). See ``itl_ray.proposals`` for how they were made.

        Raises UserError (one line, saying to run `itl-ray prepare voc2007 ROOT OUT` again) for a
        folder prepared without proposals, a missing or unreadable proposals file, or proposals of
        other images than the manifest's."""
        starts, values = self._proposal_column(int(self._shard[row]))
        offset = int(self._offset[row])
        return values[starts[offset] : starts[offset + 1]].reshape(-1, 4).astype(np.float32)


# The `itl-ray prepare` kind that each of the config's ``data`` settings expects.
PREPARE_KINDS = {"imagenet": "imagenet", "voc2007": "voc2007", "voc2012": "voc2012-action", "sun397": "sun397"}


def prepared_paths(shards_dir: str | Path) -> dict[str, str]:
    """Where the four prepared datasets lie under one folder of shards, keyed by the config's
    ``data`` setting: ``{"imagenet": "<shards_dir>/imagenet", ..., "voc2012":
    "<shards_dir>/voc2012-action", ...}`` (one sub-folder per ``itl-ray prepare`` kind, the layout
    `make demo` writes). Pure path arithmetic: nothing is checked or created."""
    return {setting: str(Path(shards_dir) / kind) for setting, kind in PREPARE_KINDS.items()}
