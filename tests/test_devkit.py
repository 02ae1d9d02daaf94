"""The devkit readers against MAT-files written here the way MATLAB writes meta.mat: chars as
miUINT16, whole-number doubles stored as miUINT8/miUINT16 when they fit, small data elements, empty
``children`` for leaves, and (in v7 files) each variable wrapped in miCOMPRESSED."""

from __future__ import annotations

import struct
import zlib

import pytest

from itl_ray.datasets.devkit import read_meta_synsets, read_val_ground_truth
from itl_ray.errors import UserError

INT8, UINT8, UINT16, INT32, UINT32, DOUBLE, MATRIX, COMPRESSED = 1, 2, 4, 5, 6, 9, 14, 15
CELL_CLASS, STRUCT_CLASS, CHAR_CLASS, DOUBLE_CLASS = 1, 2, 4, 6
FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
          "num_train_images")

# An inner node sits between the leaves, and the root's image count needs miDOUBLE (over 65535).
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


def element(kind: int, payload: bytes, order: str) -> bytes:
    """One data element: the small form for 1..4 bytes, else an 8-byte tag and data padded to 8."""
    if 0 < len(payload) <= 4:
        return struct.pack(order + "I", len(payload) << 16 | kind) + payload.ljust(4, b"\0")
    return struct.pack(order + "II", kind, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def matrix(array_class: int, dims: tuple[int, ...], body: bytes, order: str, name: str = "") -> bytes:
    head = (element(UINT32, struct.pack(order + "II", array_class, 0), order)
            + element(INT32, struct.pack(f"{order}{len(dims)}i", *dims), order)
            + element(INT8, name.encode(), order))
    return element(MATRIX, head + body, order)


def doubles(values: list[float], order: str) -> bytes:
    """A double array in the smallest type MATLAB would store it in."""
    if all(v == int(v) and 0 <= v < 256 for v in values):
        kind, code = UINT8, "B"
    elif all(v == int(v) and 0 <= v < 65536 for v in values):
        kind, code = UINT16, "H"
    else:
        kind, code = DOUBLE, "d"
    data = struct.pack(f"{order}{len(values)}{code}", *(v if code == "d" else int(v) for v in values))
    dims = (1, len(values)) if values else (0, 0)
    return matrix(DOUBLE_CLASS, dims, element(kind, data, order), order)


def chars(text: str, order: str, name: str = "") -> bytes:
    data = struct.pack(f"{order}{len(text)}H", *map(ord, text))
    return matrix(CHAR_CLASS, (1, len(text)), element(UINT16, data, order), order, name)


def synsets_struct(records: list[dict], order: str) -> bytes:
    width = 32
    body = (element(INT32, struct.pack(order + "i", width), order)
            + element(INT8, b"".join(field.encode().ljust(width, b"\0") for field in FIELDS), order))
    for record in records:
        for field in FIELDS:
            value = record[field]
            if isinstance(value, str):
                body += chars(value, order)
            else:
                body += doubles(value if isinstance(value, list) else [value], order)
    return matrix(STRUCT_CLASS, (len(records), 1), body, order, "synsets")


def mat_file(variables: list[bytes], order: str = "<", compressed: bool = True) -> bytes:
    text = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2012"
    header = text.ljust(116, b" ") + b"\0" * 8 + struct.pack(order + "H", 0x0100) + struct.pack(order + "H", 0x4D49)
    if compressed:
        variables = [struct.pack(order + "II", COMPRESSED, len(packed)) + packed
                     for packed in (zlib.compress(variable) for variable in variables)]
    return header + b"".join(variables)


def meta_mat(order: str = "<", compressed: bool = True) -> bytes:
    """A meta.mat with another variable before ``synsets``, which the reader must skip."""
    return mat_file([chars("devkit 1.0", order, name="version"), synsets_struct(SYNSETS, order)], order, compressed)


@pytest.mark.parametrize("compressed", [False, True], ids=["v6", "v7-compressed"])
@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_meta_synsets_are_the_leaves(order, compressed):
    data = meta_mat(order, compressed)
    assert data[126:128] == (b"IM" if order == "<" else b"MI")
    assert read_meta_synsets(data) == LEAVES


def test_cells_and_multi_row_chars_are_skipped_with_their_variables():
    cell = matrix(CELL_CLASS, (1, 2), chars("a", "<") + doubles([1.5], "<"), "<", name="notes")
    rows = matrix(CHAR_CLASS, (2, 2), element(UINT16, struct.pack("<4H", *map(ord, "acbd")), "<"), "<", "grid")
    assert read_meta_synsets(mat_file([cell, rows, synsets_struct(SYNSETS, "<")])) == LEAVES


def hdf5_header() -> bytes:
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2012 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\0" * 8 + struct.pack("<H", 0x0200) + b"IM"
    return header.ljust(512, b"\0") + b"\x89HDF\r\n\x1a\n" + b"\0" * 64


@pytest.mark.parametrize("data, message", [
    (b"\x00\x01garbage" * 40, "not a MATLAB 5 MAT-file"),
    (b"", "not a MATLAB 5 MAT-file"),
    (meta_mat(compressed=True)[:700], "truncated"),
    (meta_mat(compressed=False)[:700], "truncated"),
    (hdf5_header(), "v7.3"),
    (mat_file([chars("devkit 1.0", "<", name="version")]), "holds no variable 'synsets'"),
], ids=["garbage", "empty", "truncated-compressed", "truncated", "hdf5", "no-synsets"])
def test_bad_meta_files_raise_user_errors_naming_the_file(data, message):
    with pytest.raises(UserError, match=message) as raised:
        read_meta_synsets(data, "devkit/data/meta.mat")
    assert "devkit/data/meta.mat" in str(raised.value) and "\n" not in str(raised.value)


def test_synsets_without_leaves_or_fields_raise_user_errors():
    inner_only = mat_file([synsets_struct([SYNSETS[1]], "<")])
    with pytest.raises(UserError, match="meta.mat: 'synsets' has no leaf entries"):
        read_meta_synsets(inner_only)
    not_struct = mat_file([chars("n02119789", "<", name="synsets")])
    with pytest.raises(UserError, match="meta.mat: 'synsets' is not a struct array"):
        read_meta_synsets(not_struct)


def test_val_ground_truth_lines():
    assert read_val_ground_truth("490\n361\n171\n\n", "gt.txt") == [490, 361, 171]
    with pytest.raises(UserError, match=r"gt.txt line 2: 'n01440764' is not an ILSVRC2012_ID"):
        read_val_ground_truth("490\nn01440764\n171\n", "gt.txt")
    with pytest.raises(UserError, match="gt.txt line 3"):
        read_val_ground_truth("1\n2\n\n4\n", "gt.txt")
