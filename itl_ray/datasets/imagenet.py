"""ILSVRC-2012 in its usual layouts: ``ROOT/train/<wnid>/*.JPEG`` and the validation images either
sorted into ``ROOT/val/<wnid>/`` or flat in ``ROOT/val/`` (``ILSVRC2012_val_00000001.JPEG`` ...),
labelled by the devkit: ``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` (one
ILSVRC2012_ID per image) and ``meta.mat`` (ILSVRC2012_ID -> wnid), unpacked into ROOT.

Kaggle's copy (the ImageNet Object Localization Challenge) is read as well: its images lie in
``ILSVRC/Data/CLS-LOC/{train,val}`` with a flat ``val/``, labelled by ``LOC_val_solution.csv``
(``ImageId,PredictionString``, the wnid first) beside ``ILSVRC/``. ROOT may be the folder holding
``ILSVRC/`` and the CSV, or the ``ILSVRC/Data/CLS-LOC`` folder itself (the CSV is then found three
levels up, beside ``ILSVRC/``).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from itl_ray.datasets import IMAGE_SUFFIXES, LabeledImage, Root, read_lines
from itl_ray.datasets.devkit import read_meta_synsets, read_val_ground_truth
from itl_ray.errors import UserError

DEVKIT = "ILSVRC2012_devkit_t12/data"
KAGGLE_IMAGES = "ILSVRC/Data/CLS-LOC"  # Kaggle's image folder, inside the folder that holds its CSV files
KAGGLE_SOLUTION = "LOC_val_solution.csv"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$", re.IGNORECASE)


@dataclass(frozen=True)
class ImageNet:
    """Class wnids (sorted) and the train/val images, sorted by path within each class."""

    classes: tuple[str, ...]
    train: tuple[LabeledImage, ...]
    val: tuple[LabeledImage, ...]


def is_wnid(name: str) -> bool:
    """Whether ``name`` has a wnid's form: ``n`` and 8 digits (not checked against WordNet)."""
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _class_folders(root: Root, split_dir: str) -> dict[str, list[LabeledImage]]:
    by_class: dict[str, list[LabeledImage]] = {}
    for name, is_folder in root.entries(root.path(split_dir)):
        if not is_folder:
            continue
        if not is_wnid(name):
            raise UserError(f"{root.display(root.path(split_dir, name))}: ImageNet class folders must be wnids "
                            "like n01440764")
        folder = f"{split_dir}/{name}"
        by_class[name] = [LabeledImage(f"{folder}/{file}", name)
                          for file, sub in root.entries(root.path(folder)) if not sub and _is_image(file)]
    return by_class


def _solution_places(root: Root, images_dir: str) -> list[str]:
    """Where Kaggle's LOC_val_solution.csv may lie: the root, and beside ILSVRC/ when the root is
    (or holds) ILSVRC/Data/CLS-LOC."""
    places = [root.path(KAGGLE_SOLUTION)]
    if not images_dir and root.base.rstrip("/").endswith("/" + KAGGLE_IMAGES):
        places.append(posixpath.normpath(posixpath.join(root.base, "../../..", KAGGLE_SOLUTION)))
    return places


def _flat_val_labels(root: Root, images_dir: str) -> dict[int, str]:
    """Validation image number -> wnid, from the devkit (or Kaggle's solution file)."""
    truth, meta = root.path(DEVKIT, "ILSVRC2012_validation_ground_truth.txt"), root.path(DEVKIT, "meta.mat")
    if root.is_file(truth):
        if not root.is_file(meta):
            raise UserError(f"expected the devkit's meta.mat beside {root.display(truth)}; unpack "
                            "ILSVRC2012_devkit_t12 into the ImageNet root")
        wnids = read_meta_synsets(root.read_bytes(meta), root.display(meta))
        ids = read_val_ground_truth(root.read_text(truth), root.display(truth))
        unknown = sorted(set(ids) - set(wnids))
        if unknown:
            raise UserError(f"{root.display(truth)} names ILSVRC2012_ID {unknown[0]}, which meta.mat does not define")
        return {number: wnids[ilsvrc_id] for number, ilsvrc_id in enumerate(ids, start=1)}
    places = _solution_places(root, images_dir)
    for solution in places:
        if root.is_file(solution):
            return _read_solution(root, solution)
    val = root.path(images_dir, "val")
    raise UserError(f"{root.display(val)} holds images but no wnid folders: unpack ILSVRC2012_devkit_t12 into the "
                    f"root (expected {DEVKIT}/ILSVRC2012_validation_ground_truth.txt and meta.mat), put Kaggle's "
                    f"{KAGGLE_SOLUTION} at {' or '.join(root.display(place) for place in places)}, or sort val/ into "
                    "class folders")


def _read_solution(root: Root, solution: str) -> dict[int, str]:
    """Kaggle's LOC_val_solution.csv: validation image number -> wnid (the first of its boxes)."""
    labels = {}
    for line_number, line in enumerate(read_lines(root.read_text(solution))[1:], start=2):
        image_id, _, prediction = line.partition(",")
        match = VAL_NAME.match(image_id + ".JPEG")
        wnid = prediction.split()[0] if prediction.split() else ""
        if not match or not is_wnid(wnid):
            raise UserError(f"{root.display(solution)} line {line_number} is not 'ImageId,wnid ...': {line[:60]!r}")
        labels[int(match.group(1))] = wnid
    return labels


def _flat_val(root: Root, images_dir: str, names: list[str]) -> dict[str, list[LabeledImage]]:
    labels = _flat_val_labels(root, images_dir)
    val = posixpath.join(images_dir, "val")
    by_class: dict[str, list[LabeledImage]] = {}
    for name in names:
        match = VAL_NAME.match(name)
        if not match:
            raise UserError(f"{root.display(root.path(val, name))}: flat val images must be named like "
                            "ILSVRC2012_val_00000001.JPEG")
        number = int(match.group(1))
        if number not in labels:
            raise UserError(f"{root.display(root.path(val, name))} has no label in the ground truth "
                            f"({len(labels)} images labelled)")
        by_class.setdefault(labels[number], []).append(LabeledImage(f"{val}/{name}", labels[number]))
    return by_class


def read_imagenet(location: str) -> ImageNet:
    """Read and validate an ILSVRC-2012 root (a path or pyarrow URI): the usual layout, or Kaggle's
    (see the module docstring). Paths in the result are relative to the root. Raises UserError
    naming the first problem: no ``train/`` or ``val/``, a class folder that is not a wnid, a class
    without images, flat validation images without their labels (naming every place a label file
    is looked for), a validation class with no training folder."""
    root = Root(location, "ImageNet")
    images_dir = ""  # where train/ and val/ lie, relative to the root
    if not root.is_dir(root.path("train")) and root.is_dir(root.path(KAGGLE_IMAGES, "train")):
        images_dir = KAGGLE_IMAGES
    train_dir, val_dir = posixpath.join(images_dir, "train"), posixpath.join(images_dir, "val")
    root.required(train_dir, "ILSVRC-2012 train/<wnid>/ folders")
    root.required(val_dir, "ILSVRC-2012 val/ (wnid folders, or flat with the devkit)")
    train = _class_folders(root, train_dir)  # paths relative to the root, like train/n01440764/x.JPEG
    if not train:
        raise UserError(f"{root.display(root.path(train_dir))} holds no wnid folders; expected train/<wnid>/*.JPEG")
    empty = [wnid for wnid, images in train.items() if not images]
    if empty:
        raise UserError(f"{root.display(root.path(train_dir, empty[0]))} holds no images (.JPEG, .jpg or .png)")
    val = _class_folders(root, val_dir)
    flat = [name for name, is_folder in root.entries(root.path(val_dir)) if not is_folder and _is_image(name)]
    if not val and flat:
        val = _flat_val(root, images_dir, flat)
    if not val:
        raise UserError(f"{root.display(root.path(val_dir))} holds no images; expected val/<wnid>/*.JPEG or the "
                        "flat val/ILSVRC2012_val_*.JPEG with the devkit")
    unknown = sorted(set(val) - set(train))
    if unknown:
        raise UserError(f"validation class {unknown[0]} has no train/{unknown[0]}/ folder")
    classes = tuple(sorted(train))
    return ImageNet(
        classes=classes,
        train=tuple(image for wnid in classes for image in train[wnid]),
        val=tuple(image for wnid in classes for image in val.get(wnid, [])),
    )
