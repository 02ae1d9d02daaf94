"""The devkit readers against MAT-files written by ``scipy.io.savemat`` in the shape of the real
ILSVRC2012 devkit's meta.mat: a struct array ``synsets`` (N x 1) with the fields ILSVRC2012_ID,
WNID, words, gloss, num_children, children, wordnet_height and num_train_images, numbers as
doubles, ``children`` empty for the leaves, beside other variables."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.io

from itl_ray.datasets.devkit import read_meta_synsets, read_val_ground_truth
from itl_ray.errors import UserError

FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
          "num_train_images")

# An inner node sits between the leaves, as in the devkit (leaves 1..1000, inner nodes from 1001).
SYNSETS = [
    dict(ILSVRC2012_ID=1, WNID="n02119789", words="kit fox, Vulpes macrotis", gloss="small grey fox",
         num_children=0, children=[], wordnet_height=0, num_train_images=1300),
    dict(ILSVRC2012_ID=1001, WNID="n02118333", words="fox", gloss="alert carnivorous mammal",
         num_children=2, children=[1, 2], wordnet_height=1, num_train_images=2600),
    dict(ILSVRC2012_ID=2, WNID="n02085620", words="Chihuahua", gloss="an old breed of tiny dog",
         num_children=0, children=[], wordnet_height=0, num_train_images=1300),
    dict(ILSVRC2012_ID=1002, WNID="n00001740", words="entity", gloss="that which is perceived",
         num_children=1, children=[1001], wordnet_height=18, num_train_images=1281167),
    dict(ILSVRC2012_ID=3, WNID="n02086240", words="Shih-Tzu", gloss="a Chinese breed",
         num_children=0, children=[], wordnet_height=0, num_train_images=732),
]
LEAVES = {1: "n02119789", 2: "n02085620", 3: "n02086240"}


def synsets_array(records: list[dict]) -> np.ndarray:
    """A MATLAB struct array (N x 1) of ``records``: strings as char arrays, numbers as 1x1 doubles,
    ``children`` as a 1xK double row (0x0 when empty), as the devkit stores them."""
    array = np.empty((len(records), 1), dtype=[(field, object) for field in FIELDS])
    for index, record in enumerate(records):
        for field in FIELDS:
            value = record[field]
            if isinstance(value, str):
                array[index, 0][field] = value
            elif isinstance(value, list):
                array[index, 0][field] = (np.array(value, dtype=np.float64).reshape(1, -1) if value
                                          else np.zeros((0, 0)))
            else:
                array[index, 0][field] = np.array([[value]], dtype=np.float64)
    return array


def meta_mat(records: list[dict] = SYNSETS, compressed: bool = True, **others) -> bytes:
    """A meta.mat written by scipy.io.savemat (MAT level 5; ``compressed``: miCOMPRESSED, as MATLAB's
    -v7), with another variable before ``synsets`` that the reader must skip."""
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"version": "devkit 1.0", **others, "synsets": synsets_array(records)},
                     do_compression=compressed)
    return buffer.getvalue()


@pytest.mark.parametrize("compressed", [False, True], ids=["v6", "v7-compressed"])
def test_meta_synsets_are_the_leaves(compressed):
    data = meta_mat(compressed=compressed)
    assert data[126:128] == b"IM" and data.startswith(b"MATLAB 5.0 MAT-file")
    assert read_meta_synsets(data) == LEAVES


def test_one_leaf_and_other_variables():
    cell = np.array([["a", 1.5]], dtype=object)
    assert read_meta_synsets(meta_mat(SYNSETS[:1], notes=cell, grid=np.array(["ab", "cd"]))) == {1: "n02119789"}


def mat_file(**variables) -> bytes:
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables)
    return buffer.getvalue()


def hdf5_header() -> bytes:
    """The start of a MATLAB v7.3 file: the text header, version 0x0200, then HDF5 at byte 512."""
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2012 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\0" * 8 + (0x0200).to_bytes(2, "little") + b"IM"
    return header.ljust(512, b"\0") + b"\x89HDF\r\n\x1a\n" + b"\0" * 64


def v73_without_the_text() -> bytes:
    """A header that announces version 0x0200 (v7.3) without saying so in its text."""
    return hdf5_header()[:116].replace(b"7.3", b"7.x") + hdf5_header()[116:512]


@pytest.mark.parametrize("data, message", [
    (b"\x00\x01garbage" * 40, "not a readable MATLAB 5 MAT-file"),
    (b"", "not a readable MATLAB 5 MAT-file"),
    (meta_mat(compressed=True)[:300], "not a readable MATLAB 5 MAT-file"),
    (meta_mat(compressed=False)[:700], "not a readable MATLAB 5 MAT-file"),
    (hdf5_header(), "v7.3 \\(HDF5\\) MAT-file, which is not supported: re-save it with save -v7"),
    (v73_without_the_text(), "v7.3 \\(HDF5\\) MAT-file, which is not supported: re-save it with save -v7"),
    (mat_file(version="devkit 1.0"), "holds no variable 'synsets'"),
], ids=["garbage", "empty", "truncated-compressed", "truncated", "hdf5", "v7.3-version", "no-synsets"])
def test_bad_meta_files_raise_user_errors_naming_the_file(data, message):
    with pytest.raises(UserError, match=message) as raised:
        read_meta_synsets(data, "devkit/data/meta.mat")
    assert str(raised.value).startswith("devkit/data/meta.mat") and "\n" not in str(raised.value)


def test_synsets_without_leaves_or_fields_raise_user_errors():
    with pytest.raises(UserError, match="meta.mat: 'synsets' has no leaf entries"):
        read_meta_synsets(meta_mat([SYNSETS[1]]))
    with pytest.raises(UserError, match="meta.mat: 'synsets' is not a struct array"):
        read_meta_synsets(mat_file(synsets="n02119789"))
    two_fields = np.array([[(1.0, "n02119789")]], dtype=[("ILSVRC2012_ID", object), ("WNID", object)])
    with pytest.raises(UserError, match=r"meta.mat: 'synsets' lacks the field\(s\) num_children"):
        read_meta_synsets(mat_file(synsets=two_fields))
    with pytest.raises(UserError, match="ILSVRC2012_ID 1 appears twice"):
        read_meta_synsets(meta_mat([SYNSETS[0], dict(SYNSETS[2], ILSVRC2012_ID=1)]))
    with pytest.raises(UserError, match=r"synsets\(2\) does not hold a whole-number ID"):
        read_meta_synsets(meta_mat([SYNSETS[0], dict(SYNSETS[2], ILSVRC2012_ID=2.5)]))


def test_val_ground_truth_lines():
    assert read_val_ground_truth("490\n361\n171\n\n", "gt.txt") == [490, 361, 171]
    with pytest.raises(UserError, match=r"gt.txt line 2: 'n01440764' is not an ILSVRC2012_ID"):
        read_val_ground_truth("490\nn01440764\n171\n", "gt.txt")
    with pytest.raises(UserError, match="gt.txt line 3"):
        read_val_ground_truth("1\n2\n\n4\n", "gt.txt")
