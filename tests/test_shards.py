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
from itl_ray.shards import (FORMAT_VERSION, INFO, MANIFEST, PLAN, PROPOSALS, SHARDS, Prepared, proposals_path,
                            read_proposals, read_shard, shard_path, shard_skipped, write_proposals, write_shard)


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
    # The default paths (a fresh clone before `make demo`) say how the mini-benchmark is made.
    with pytest.raises(UserError, match=r"mini-shards/imagenet does not exist; `make demo` makes the mini-benchmark"):
        Prepared(tmp_path / "data" / "mini-shards" / "imagenet", "imagenet", "data.imagenet")
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


def proposal_boxes(count: int, seed: int) -> list[np.ndarray]:
    """Per image, 0 to 40 distinct boxes (x1, y1, x2, y2) with x1 <= x2, y1 <= y2, up to 499."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        corners = rng.integers(0, 500, size=(int(rng.integers(0, 41)) if index else 0, 4))
        out.append(np.concatenate([np.minimum(corners[:, :2], corners[:, 2:]),
                                   np.maximum(corners[:, :2], corners[:, 2:])], axis=1))
    return out


def with_proposals(folder, boxes: list[np.ndarray]) -> None:
    """Proposals files for ``prepared_folder``'s two shards (rows 0-4 and 5-7 of the plan, with the
    checksums ``shard_columns`` gives them), and PREPARED.json saying they were made."""
    (folder / PROPOSALS).mkdir()
    write_proposals(proposals_path(folder, 0), range(5), [f"{i:064x}" for i in range(5)], boxes[:5])
    write_proposals(proposals_path(folder, 1), range(5, 8), [f"{i:064x}" for i in range(5, 8)], boxes[5:])
    info = json.loads((folder / INFO).read_text())
    (folder / INFO).write_text(json.dumps({**info, "proposals": {"method": "selective_search_fast"}}))


def test_proposals_read_back_per_row_as_float32_boxes(tmp_path):
    folder = tmp_path / "voc"
    prepared_folder(folder, kind="voc2007")
    pq.write_table(pq.read_table(folder / MANIFEST).append_column(
        "sha256", pa.array([f"{5 * shard + offset:064x}" for shard, offset in
                            [(1, 0), (1, 1), (1, 2), (0, 4), (0, 3), (0, 2), (0, 1), (0, 0)]])), folder / MANIFEST)
    boxes = proposal_boxes(8, seed=4)  # boxes[i]: plan item i (item 0 has none)
    with_proposals(folder, boxes)
    data = Prepared(folder, "voc2007")
    items = [5, 6, 7, 4, 3, 2, 1, 0]  # the plan item of each manifest row (see prepared_folder)
    for row in (7, 0, 3, 5, 7):
        got = data.proposals(row)
        assert got.dtype == np.float32 and got.shape == (len(boxes[items[row]]), 4)
        assert np.array_equal(got, boxes[items[row]].astype(np.float32))  # same boxes, same order
    assert data.proposals(7).shape == (0, 4)


def test_proposals_of_another_folder_or_none_say_prepare_again(tmp_path):
    folder = tmp_path / "voc"
    prepared_folder(folder, kind="voc2007")
    sums = [f"{5 * shard + offset:064x}" for shard, offset in [(1, 0), (1, 1), (1, 2), (0, 4), (0, 3), (0, 2),
                                                               (0, 1), (0, 0)]]
    pq.write_table(pq.read_table(folder / MANIFEST).append_column("sha256", pa.array(sums)), folder / MANIFEST)
    again = r"run `itl-ray prepare voc2007 ROOT OUT` again"
    with pytest.raises(UserError, match=r"data.voc2007=.* holds no Selective Search proposals \(prepared with "
                                        r"--no-proposals .*" + again + ", or set transfer.detection.proposals: "
                                        "sliding_window"):
        Prepared(folder, "voc2007", "data.voc2007").proposals(0)
    with pytest.raises(UserError, match="holds no Selective Search proposals"):
        Prepared(folder, "voc2007").check_proposals()
    with_proposals(folder, proposal_boxes(8, seed=5))
    Prepared(folder, "voc2007").check_proposals()
    assert Prepared(folder, "voc2007").proposals(0).shape[1] == 4
    # Shard 1's proposals replaced by those of other images (other checksums).
    write_proposals(proposals_path(folder, 1), range(5, 8), [f"{i:064x}" for i in range(105, 108)],
                    proposal_boxes(3, seed=6))
    data = Prepared(folder, "voc2007")
    assert data.proposals(3).shape[1] == 4  # rows of shard 0 still read
    with pytest.raises(UserError, match="holds the proposals of other images than the manifest's; " + again):
        data.proposals(0)
    with pytest.raises(UserError, match="proposals-00001.arrow holds the proposals of other images"):
        Prepared(folder, "voc2007").check_proposals()
    proposals_path(folder, 1).unlink()
    with pytest.raises(UserError, match=r"proposals-00001.arrow is missing; " + again):
        Prepared(folder, "voc2007").proposals(1)
    proposals_path(folder, 1).write_bytes(b"ARROW1 not really")
    with pytest.raises(UserError, match=r"proposals-00001.arrow is not a readable proposals file .*" + again):
        Prepared(folder, "voc2007").proposals(2)


def test_proposal_coordinates_must_fit_the_format(tmp_path):
    with pytest.raises(ValueError, match="0..65535"):
        write_proposals(tmp_path / "p.arrow", [0], ["0" * 64], [np.array([[-1, 0, 5, 5]])])
    with pytest.raises(ValueError, match="0..65535"):
        write_proposals(tmp_path / "p.arrow", [0], ["0" * 64], [np.array([[0, 0, 65536, 5]])])
    assert not (tmp_path / "p.arrow").exists()
    write_proposals(tmp_path / "p.arrow", [0, 1], ["a", "b"], [np.array([[0, 0, 65535, 65535]]), np.zeros((0, 4))])
    table = read_proposals(tmp_path / "p.arrow")
    assert table.column("boxes").to_pylist() == [[0, 0, 65535, 65535], []]
