"""Prepared folders: shards written and read back byte for byte, rows fetched in any order and as
zero-copy views, splits by row, a failed shard write that leaves the old file, and one-line errors
for folders that are not (or not yet, or not this kind of) prepared datasets."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from itl_ray.errors import UserError
from itl_ray.shards import (FORMAT_VERSION, INFO, MANIFEST, PLAN, SHARDS, Prepared, read_shard, shard_path,
                            shard_skipped, write_shard)


def payloads(count: int, seed: int) -> list[bytes]:
    """Distinct byte strings of different lengths (0 to 299 bytes; the shards store any binary)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes() + bytes([index % 256])
            for index in range(count)]


def shard_columns(items: list[int], data: list[bytes]) -> dict[str, list]:
    return {"item": items, "jpeg": data, "width": [10 + i for i in items], "height": [20 + i for i in items],
            "source_width": [30] * len(items), "source_height": [40] * len(items),
            "sha256": [f"{i:064x}" for i in items]}


def prepared_folder(folder, kind: str = "imagenet") -> tuple[list[bytes], list[str]]:
    """A prepared folder written by hand: two shards (5 and 3 rows), a manifest whose rows list them
    in another order than they are stored, and PREPARED.json. Returns the bytes and splits per row."""
    stored = payloads(8, seed=1)
    (folder / SHARDS).mkdir(parents=True)
    write_shard(shard_path(folder, 0), shard_columns(list(range(5)), stored[:5]), skipped=[])
    write_shard(shard_path(folder, 1), shard_columns(list(range(5, 8)), stored[5:]),
                skipped=[{"source": "broken.JPEG", "reason": "truncated"}])
    # Manifest rows: shard 1 first, then shard 0 backwards.
    places = [(1, 0), (1, 1), (1, 2), (0, 4), (0, 3), (0, 2), (0, 1), (0, 0)]
    splits = ["train", "train,val", "val", "train", "test", "train", "val", "train"]
    pq.write_table(pa.table({"row": list(range(8)), "split": splits,
                             "shard": [shard for shard, _ in places], "offset": [offset for _, offset in places],
                             "label": [f"n{row:08d}" for row in range(8)],
                             "height": [20 + 5 * shard + offset for shard, offset in places],
                             "width": [10 + 5 * shard + offset for shard, offset in places]}),
                   folder / MANIFEST)
    (folder / INFO).write_text(json.dumps({"format_version": FORMAT_VERSION, "kind": kind}))
    return [stored[5 * shard + offset] for shard, offset in places], splits


def test_a_shard_reads_back_what_was_written(tmp_path):
    data = payloads(6, seed=0)
    path = tmp_path / "shard-00000.arrow"
    skipped = [{"source": "a/b.JPEG", "reason": "not a JPEG"}]
    write_shard(path, shard_columns(list(range(6)), data), skipped)
    table = read_shard(path)
    assert table.column("jpeg").to_pylist() == data
    assert table.column("item").to_pylist() == list(range(6))
    assert table.column("width").to_pylist() == [10, 11, 12, 13, 14, 15]
    assert shard_skipped(table) == skipped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.arrow"]  # no temporary left


def test_a_failed_shard_write_leaves_the_old_shard(tmp_path, monkeypatch):
    path = tmp_path / "shard-00000.arrow"
    data = payloads(3, seed=2)
    write_shard(path, shard_columns([0, 1, 2], data), [])

    def disk_full(sink, schema):  # the writer fails after half a file reached the disk
        sink.write(b"ARROW1\0\0 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(pa.ipc, "new_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        write_shard(path, shard_columns([0, 1, 2], payloads(3, seed=3)), [])
    assert read_shard(path).column("jpeg").to_pylist() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.arrow"]


def test_rows_read_back_byte_for_byte_in_any_order(tmp_path):
    expected, splits = prepared_folder(tmp_path / "prepared")
    data = Prepared(tmp_path / "prepared", "imagenet")
    assert len(data) == 8
    assert data.read(range(8)) == expected
    rows = [6, 0, 3, 3, 7, 1]
    assert data.read(rows) == [expected[row] for row in rows]
    views = data.views(rows)
    assert all(not view.flags.writeable for view in views)  # views of the memory-mapped shard files
    assert [view.tobytes() for view in views] == [expected[row] for row in rows]
    assert data.column("label") == [f"n{row:08d}" for row in range(8)]


def test_splits_select_rows_by_name(tmp_path):
    _, splits = prepared_folder(tmp_path / "prepared")
    data = Prepared(tmp_path / "prepared", "imagenet")
    assert data.rows_in("train").tolist() == [0, 1, 3, 5, 7]
    assert data.rows_in("val").tolist() == [1, 2, 6]
    assert data.rows_in("test").tolist() == [4]
    assert data.rows_in("trainval").tolist() == []  # a whole name, not a substring
    assert data.rows_in("train").dtype == np.int64


def test_folders_that_are_not_prepared_datasets_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"data.imagenet=.*missing does not exist; run `itl-ray prepare imagenet"):
        Prepared(tmp_path / "missing", "imagenet", "data.imagenet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a prepared dataset"):
        Prepared(tmp_path / "empty", "imagenet")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / PLAN).write_text("{}")
    with pytest.raises(UserError, match="its preparation did not finish; rerun `itl-ray prepare sun397 ROOT"):
        Prepared(tmp_path / "half", "sun397")
    prepared_folder(tmp_path / "voc", kind="voc2007")
    with pytest.raises(UserError, match="holds a prepared voc2007 dataset, not imagenet"):
        Prepared(tmp_path / "voc", "imagenet")
    info = tmp_path / "voc" / INFO
    info.write_text(json.dumps({"format_version": FORMAT_VERSION + 1, "kind": "voc2007"}))
    with pytest.raises(UserError, match="was prepared by another itl_ray version; prepare it again"):
        Prepared(tmp_path / "voc", "voc2007")


def test_verify_accepts_a_sound_folder(tmp_path):
    prepared_folder(tmp_path / "prepared")
    data = Prepared(tmp_path / "prepared", "imagenet", "data.imagenet")
    assert data.verify() is data


def damage(folder, what: str) -> None:
    """One kind of damage to the prepared folder ``prepared_folder`` wrote."""
    shard = shard_path(folder, 1)
    if what == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif what == "missing shard":
        shard.unlink()
    elif what == "shard with other rows":
        write_shard(shard, shard_columns([5, 6], payloads(2, seed=5)), skipped=[])
    elif what == "shard of another size":
        info = json.loads((folder / INFO).read_text())
        sizes = [shard_path(folder, index).stat().st_size for index in range(2)]
        (folder / INFO).write_text(json.dumps({**info, "shards": 2, "shard_bytes": [sizes[0], sizes[1] + 8]}))
    elif what == "not a shard":
        pq.write_table(pa.table({"item": [5, 6, 7]}), shard)
    elif what == "missing manifest":
        (folder / MANIFEST).unlink()
    elif what == "truncated manifest":
        manifest = folder / MANIFEST
        manifest.write_bytes(manifest.read_bytes()[:40])


@pytest.mark.parametrize("what, message", [
    ("truncated shard", r"shards/shard-00001\.arrow is not a readable Arrow file \(.*\); prepare the dataset again "
                        r"\(`itl-ray prepare imagenet ROOT OUT`, OUT a new folder\) and point data\.imagenet at it"),
    ("missing shard", r"shards/shard-00001\.arrow is missing; prepare the dataset again"),
    ("shard with other rows", r"shards/shard-00001\.arrow holds 2 images, the manifest lists 3"),
    ("shard of another size", r"shards/shard-00001\.arrow has [\d,]+ bytes, [\d,]+ when it was prepared"),
    ("not a shard", r"shards/shard-00001\.arrow is not a readable Arrow file"),
    ("missing manifest", r"manifest\.parquet is missing; prepare the dataset again"),
    ("truncated manifest", r"manifest\.parquet is not a readable Parquet file"),
])
def test_a_damaged_folder_is_named_with_its_file(tmp_path, what, message):
    """Cheap checks (footers, schemas, row counts, sizes), one line naming the setting and the file."""
    folder = tmp_path / "prepared"
    prepared_folder(folder)
    damage(folder, what)
    with pytest.raises(UserError, match=r"^data\.imagenet=.*prepared: " + message):
        Prepared(folder, "imagenet", "data.imagenet").verify()


def test_a_prepared_folder_records_its_content_hash_and_shard_sizes(mini_paths):
    from itl_ray.shards import manifest_hash

    for setting, kind in (("voc2012", "voc2012-action"), ("sun397", "sun397")):
        data = Prepared(mini_paths[setting], kind).verify()
        assert data.info["shard_bytes"] == [shard_path(data.folder, index).stat().st_size
                                            for index in range(data.info["shards"])]
        assert data.content_hash == data.info["content_hash"] == manifest_hash(data.manifest, data.info)
        assert len(data.content_hash) == 16
    assert Prepared(mini_paths["voc2012"], "voc2012-action").content_hash != \
        Prepared(mini_paths["sun397"], "sun397").content_hash
