"""The ILSVRC-2012 devkit files that label a flat validation folder.

``data/ILSVRC2012_validation_ground_truth.txt`` has one ILSVRC2012_ID per line (line i labels
``ILSVRC2012_val_0000000i.JPEG``); ``data/meta.mat`` maps those IDs to WNIDs in its variable
``synsets``, a 1860x1 struct array with the fields ILSVRC2012_ID, WNID, words, gloss,
num_children, children, wordnet_height and num_train_images: the 1000 leaves (IDs 1..1000,
``num_children == 0``) and the WordNet nodes above them.

meta.mat is a MATLAB level-5 MAT-file (as ``save -v6`` or ``-v7`` write it), read with
``scipy.io.loadmat``. MATLAB v7.3 files (HDF5 inside) are refused with a line that says how to
re-save them.
"""

from __future__ import annotations

import io
import zlib

from itl_ray.errors import UserError

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
V73_MESSAGE = "a MATLAB v7.3 (HDF5) MAT-file, which is not supported: re-save it with save -v7"
FIELDS = ("ILSVRC2012_ID", "WNID", "num_children")  # the fields read from each entry of 'synsets'


def _is_hdf5(data: bytes) -> bool:
    """An HDF5 file: its signature at the start, or after MATLAB's 512-byte v7.3 user block."""
    return data[:8] == HDF5_SIGNATURE or data[512:520] == HDF5_SIGNATURE or data.startswith(b"MATLAB 7.3")


def _whole_number(value) -> bool:
    try:
        return float(value).is_integer()
    except (TypeError, ValueError):
        return False


def read_meta_synsets(data: bytes, name: str = "meta.mat") -> dict[int, str]:
    """{ILSVRC2012_ID: WNID} of the leaf synsets (``num_children == 0``) in the devkit's meta.mat,
    given as the file's bytes; ``name`` names the file in errors.

    Raises UserError (one line naming the file) for a v7.3 (HDF5) file, bytes that are not a readable
    MAT-file (garbage, truncated), a file without the variable ``synsets``, a ``synsets`` that is not
    a struct array with whole-number ILSVRC2012_ID and num_children and a string WNID, a leaf ID
    listed twice, or no leaf at all."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    if _is_hdf5(data):
        raise UserError(f"{name}: {V73_MESSAGE}")
    try:
        # simplify_cells: a struct array reads as a list of {field: value} (one entry: a dict),
        # scalars as numbers, char arrays as str.
        contents = loadmat(io.BytesIO(data), variable_names=["synsets"], simplify_cells=True)
    except NotImplementedError:  # scipy's answer to the v7.3 version number in the header
        raise UserError(f"{name}: {V73_MESSAGE}") from None
    except (MatReadError, ValueError, OSError, EOFError, IndexError, TypeError, zlib.error) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{name}: not a readable MATLAB 5 MAT-file ({reason}); unpack the devkit's data/meta.mat "
                        "again") from None
    if "synsets" not in contents:
        raise UserError(f"{name} holds no variable 'synsets'")
    synsets = contents["synsets"]
    if isinstance(synsets, dict):
        synsets = [synsets]
    if not isinstance(synsets, list) or not all(isinstance(entry, dict) for entry in synsets):
        raise UserError(f"{name}: 'synsets' is not a struct array")
    leaves: dict[int, str] = {}
    for index, entry in enumerate(synsets, start=1):
        missing = set(FIELDS) - entry.keys()
        if missing:
            raise UserError(f"{name}: 'synsets' lacks the field(s) {', '.join(sorted(missing))}")
        synset_id, children, wnid = (entry[field] for field in ("ILSVRC2012_ID", "num_children", "WNID"))
        if not (_whole_number(synset_id) and _whole_number(children) and isinstance(wnid, str)):
            raise UserError(f"{name}: synsets({index}) does not hold a whole-number ID, num_children and a WNID")
        if float(children) == 0:
            if int(synset_id) in leaves:
                raise UserError(f"{name}: ILSVRC2012_ID {int(synset_id)} appears twice in 'synsets'")
            leaves[int(synset_id)] = wnid
    if not leaves:
        raise UserError(f"{name}: 'synsets' has no leaf entries (num_children == 0)")
    return leaves


def read_val_ground_truth(text: str, name: str) -> list[int]:
    """The ILSVRC2012_ID on each line of the devkit's validation ground truth (line i labels
    validation image i), given as the file's text; trailing blank lines are ignored. Raises
    UserError naming ``name`` and the line for a value that is not a positive integer."""
    lines = text.rstrip().splitlines()
    labels = []
    for number, line in enumerate(lines, start=1):
        value = line.strip()
        if not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise UserError(f"{name} line {number}: {value!r} is not an ILSVRC2012_ID (a positive integer)")
        labels.append(int(value))
    return labels
