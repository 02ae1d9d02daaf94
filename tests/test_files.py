"""Atomic writes: the target holds the old or the new content, never a torn file or a leftover."""

import json

import pytest

from itl_ray.files import atomic_path, write_atomically, write_json


def test_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    write_json(target, {"b": 1, "a": [1, 2]})
    write_json(target, {"c": 3})
    assert json.loads(target.read_text()) == {"c": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    write_atomically(tmp_path / "raw.bin", b"\x00\x01")
    assert (tmp_path / "raw.bin").read_bytes() == b"\x00\x01"


def test_failed_writer_keeps_old_content_and_removes_temporary(tmp_path):
    target = tmp_path / "stages.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stages.json"]
