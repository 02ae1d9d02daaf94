"""The ILSVRC-2012 devkit files that label a flat validation folder, read without scipy.

``data/ILSVRC2012_validation_ground_truth.txt`` has one ILSVRC2012_ID per line (line i labels
``ILSVRC2012_val_0000000i.JPEG``); ``data/meta.mat`` maps those IDs to WNIDs in its variable
``synsets``, a struct array of 1860 entries: the 1000 leaves (IDs 1..1000, ``num_children == 0``)
and the WordNet nodes above them.

meta.mat is a MATLAB level-5 MAT-file; this reader handles the parts such a file uses:

- a 128-byte header: descriptive text, version 0x0100 and the endian indicator, which reads 'IM'
  in a little-endian file and 'MI' in a big-endian one. Version 7.3 files (HDF5 inside) are
  refused: re-save them with ``save -v7``;
- data elements, each an 8-byte tag (type, byte count) plus data padded to 8 bytes, or the small
  form for up to 4 bytes, where one 32-bit word holds the count (high half) and type (low half);
- miCOMPRESSED elements (MATLAB v7): a zlib stream holding one whole element, not padded;
- miMATRIX elements: array flags (class in the low byte), dimensions, name, then by class:
  numbers (whose data may be stored in a smaller type, such as miUINT8 for a double 3), chars
  (miUTF8, miUTF16 or code units in miUINT16/miUINT8), cells, and structs (field-name length,
  the padded field names, then one miMATRIX per field per element, column-major). Other classes
  (sparse, objects) read as None; an element with no bytes is an empty array.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import numpy as np

from itl_ray.errors import UserError

NUMBER_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
UINT32, SINGLE, DOUBLE, MATRIX, COMPRESSED, UTF8, UTF16, UTF32 = 6, 7, 9, 14, 15, 16, 17, 18
CELL_CLASS, STRUCT_CLASS, CHAR_CLASS = 1, 2, 4
NUMBER_CLASSES = range(6, 16)  # mxDOUBLE_CLASS .. mxUINT64_CLASS
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class MalformedFile(Exception):
    """What is wrong with the bytes; ``read_meta_synsets`` turns it into a UserError naming the file."""


def elements(data: bytes, order: str) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each data element in ``data``; ``order`` is struct's '<' or '>'."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 8:
            raise MalformedFile("truncated data element tag")
        (word,) = struct.unpack_from(order + "I", data, offset)
        if word >> 16:  # small data element: count and type share one word, data in the next four bytes
            kind, size = word & 0xFFFF, word >> 16
            if size > 4:
                raise MalformedFile(f"small data element claims {size} bytes")
            yield kind, data[offset + 4:offset + 4 + size]
            offset += 8
            continue
        kind, size = struct.unpack_from(order + "II", data, offset)
        start = offset + 8
        if start + size > len(data):
            raise MalformedFile(f"data element of {size} bytes runs past the end (truncated file?)")
        yield kind, data[start:start + size]
        offset = start + size if kind == COMPRESSED else start + (size + 7) // 8 * 8


def numbers(kind: int, payload: bytes, order: str) -> np.ndarray:
    if kind not in NUMBER_TYPES:
        raise MalformedFile(f"data element of type {kind} where numbers were expected")
    dtype = np.dtype(order + NUMBER_TYPES[kind])
    if len(payload) % dtype.itemsize:
        raise MalformedFile(f"{len(payload)} bytes of type {kind} do not divide into numbers")
    return np.frombuffer(payload, dtype)


def characters(kind: int, payload: bytes, order: str) -> str:
    if kind == UTF8:
        return payload.decode("utf-8", errors="replace")
    if kind in (UTF16, UTF32):
        codec = {UTF16: "utf-16", UTF32: "utf-32"}[kind] + ("-le" if order == "<" else "-be")
        return payload.decode(codec, errors="replace")
    if kind in (SINGLE, DOUBLE):
        raise MalformedFile("char array stored as floating-point numbers")
    return "".join(map(chr, numbers(kind, payload, order).tolist()))  # code units, e.g. miUINT16


def matrix(payload: bytes, order: str, only: str | None = None) -> tuple[str, object]:
    """(name, value) of one miMATRIX element; the value is decoded only if ``only`` is None or the name.

    Values: numeric and logical arrays as numpy arrays in MATLAB's shape, char arrays as a string
    (one row) or a list of rows, cells as a flat list, structs as a flat list of {field: value}.
    """
    if not payload:
        return "", np.empty((0, 0))
    parts = list(elements(payload, order))
    if len(parts) < 3:
        raise MalformedFile("array lacks its flags, dimensions or name")
    (_, flags), (dims_kind, dims_raw), (_, name_raw) = parts[:3]
    name = name_raw.decode("ascii", errors="replace")
    if only is not None and name != only:
        return name, None
    if len(flags) < 4:
        raise MalformedFile(f"array {name!r} has no array flags")
    flags_word = int(numbers(UINT32, flags[:4], order)[0])  # class in the low byte; 0x0200 marks logical
    array_class = flags_word & 0xFF
    dims = tuple(int(d) for d in numbers(dims_kind, dims_raw, order))
    count, body = int(np.prod(dims)), parts[3:]
    if array_class == STRUCT_CLASS:
        if len(body) < 2:
            raise MalformedFile(f"struct array {name!r} lacks its field names")
        name_length, raw_names = numbers(*body[0], order), body[1][1]
        if name_length.size != 1 or name_length[0] < 1:
            raise MalformedFile(f"struct array {name!r} has no valid field-name length")
        step = int(name_length[0])
        fields = [raw_names[i:i + step].split(b"\0")[0].decode("ascii", errors="replace")
                  for i in range(0, len(raw_names), step)]
        values = [value for _, value in member_matrices(body[2:], order, len(fields) * count, name)]
        return name, [dict(zip(fields, values[i * len(fields):(i + 1) * len(fields)])) for i in range(count)]
    if array_class == CELL_CLASS:
        return name, [value for _, value in member_matrices(body, order, count, name)]
    if not body:
        raise MalformedFile(f"array {name!r} has no data")
    if array_class == CHAR_CLASS:
        text = characters(*body[0], order)
        if len(text) != count:
            raise MalformedFile(f"char array {name!r} has {len(text)} characters for dimensions {dims}")
        rows = dims[0] if len(dims) == 2 else 1
        return name, text if rows <= 1 else [text[row::rows] for row in range(rows)]  # column-major
    if array_class in NUMBER_CLASSES or flags_word & 0x0200:
        values = numbers(*body[0], order)
        if values.size != count:
            raise MalformedFile(f"array {name!r} has {values.size} values for dimensions {dims}")
        return name, values.reshape(dims, order="F")
    return name, None  # sparse, objects and the like: not needed here


def member_matrices(parts: list[tuple[int, bytes]], order: str, count: int, owner: str) -> list[tuple[str, object]]:
    if len(parts) != count or any(kind != MATRIX for kind, _ in parts):
        raise MalformedFile(f"{owner!r} should hold {count} arrays but holds {len(parts)} elements")
    return [matrix(payload, order) for _, payload in parts]


def read_variable(data: bytes, wanted: str) -> object:
    """The value of the variable named ``wanted`` in a level-5 MAT-file, or None if it has none."""
    if data[:8] == HDF5_SIGNATURE or data[512:520] == HDF5_SIGNATURE or data.startswith(b"MATLAB 7.3"):
        raise MalformedFile("a MATLAB v7.3 (HDF5) MAT-file, which is not supported: re-save it with save -v7")
    if len(data) < 128 or data[126:128] not in (b"IM", b"MI"):
        raise MalformedFile("not a MATLAB 5 MAT-file")
    order = "<" if data[126:128] == b"IM" else ">"
    (version,) = struct.unpack_from(order + "H", data, 124)
    if version != 0x0100:
        raise MalformedFile(f"MAT-file version {version:#06x} is not supported (expected 0x0100, MATLAB 5 to 7)")
    for kind, payload in elements(data[128:], order):
        if kind == COMPRESSED:
            try:
                payload = zlib.decompress(payload)
            except zlib.error as error:
                raise MalformedFile(f"compressed data element is corrupt ({error})") from None
            kind, payload = next(elements(payload, order), (0, b""))
        if kind == MATRIX:
            name, value = matrix(payload, order, only=wanted)
            if name == wanted:
                return value
    return None


def read_meta_synsets(data: bytes, name: str = "meta.mat") -> dict[int, str]:
    """{ILSVRC2012_ID: WNID} of the leaf synsets (``num_children == 0``) in the devkit's meta.mat."""
    try:
        synsets = read_variable(data, "synsets")
    except MalformedFile as error:
        raise UserError(f"{name}: {error}") from None
    except (ValueError, IndexError, OverflowError) as error:  # odd values the checks above let through
        raise UserError(f"{name}: malformed MAT-file ({error})") from None
    if synsets is None:
        raise UserError(f"{name} holds no variable 'synsets'")
    if not isinstance(synsets, list) or not all(isinstance(entry, dict) for entry in synsets):
        raise UserError(f"{name}: 'synsets' is not a struct array")
    leaves: dict[int, str] = {}
    for index, entry in enumerate(synsets, start=1):
        missing = {"ILSVRC2012_ID", "WNID", "num_children"} - entry.keys()
        if missing:
            raise UserError(f"{name}: 'synsets' lacks the field(s) {', '.join(sorted(missing))}")
        synset_id, children, wnid = (entry[field] for field in ("ILSVRC2012_ID", "num_children", "WNID"))
        if not (isinstance(synset_id, np.ndarray) and synset_id.size == 1 and float(synset_id.item()).is_integer()
                and isinstance(children, np.ndarray) and children.size == 1 and isinstance(wnid, str)):
            raise UserError(f"{name}: synsets({index}) does not hold a whole-number ID, num_children and a WNID")
        if children.item() == 0:
            if int(synset_id.item()) in leaves:
                raise UserError(f"{name}: ILSVRC2012_ID {int(synset_id.item())} appears twice in 'synsets'")
            leaves[int(synset_id.item())] = wnid
    if not leaves:
        raise UserError(f"{name}: 'synsets' has no leaf entries (num_children == 0)")
    return leaves


def read_val_ground_truth(text: str, name: str) -> list[int]:
    """The ILSVRC2012_ID on each line (line i labels validation image i); trailing blank lines ignored."""
    lines = text.rstrip().splitlines()
    labels = []
    for number, line in enumerate(lines, start=1):
        value = line.strip()
        if not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise UserError(f"{name} line {number}: {value!r} is not an ILSVRC2012_ID (a positive integer)")
        labels.append(int(value))
    return labels
