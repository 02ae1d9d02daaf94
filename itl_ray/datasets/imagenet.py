"""ILSVRC-2012 in its usual layouts: ``ROOT/train/<wnid>/*.JPEG`` and the validation images either
sorted into ``ROOT/val/<wnid>/`` or flat in ``ROOT/val/`` (``ILSVRC2012_val_00000001.JPEG`` ...),
labelled by the devkit: ``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` (one
ILSVRC2012_ID per image) and ``meta.mat`` (ILSVRC2012_ID -> wnid), unpacked into ROOT. The
``LOC_val_solution.csv`` of the Kaggle copy (``ImageId,PredictionString``, the wnid first) is read
as well when there is no devkit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from itl_ray.datasets import IMAGE_SUFFIXES, LabeledImage, Root, read_lines
from itl_ray.datasets.devkit import read_meta_synsets, read_val_ground_truth
from itl_ray.errors import UserError

DEVKIT = "ILSVRC2012_devkit_t12/data"
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


def _flat_val_labels(root: Root) -> dict[int, str]:
    """Validation image number -> wnid, from the devkit (or the Kaggle solution file)."""
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
    solution = root.path("LOC_val_solution.csv")
    if root.is_file(solution):
        labels = {}
        for line_number, line in enumerate(read_lines(root.read_text(solution))[1:], start=2):
            image_id, _, prediction = line.partition(",")
            match = VAL_NAME.match(image_id + ".JPEG")
            wnid = prediction.split()[0] if prediction.split() else ""
            if not match or not is_wnid(wnid):
                raise UserError(f"{root.display(solution)} line {line_number} is not 'ImageId,wnid ...': {line[:60]!r}")
            labels[int(match.group(1))] = wnid
        return labels
    raise UserError(f"{root.display(root.path('val'))} holds images but no wnid folders: unpack "
                    f"ILSVRC2012_devkit_t12 into the root (expected {DEVKIT}/ILSVRC2012_validation_ground_truth.txt "
                    "and meta.mat), or sort val/ into class folders")


def _flat_val(root: Root, names: list[str]) -> dict[str, list[LabeledImage]]:
    labels = _flat_val_labels(root)
    by_class: dict[str, list[LabeledImage]] = {}
    for name in names:
        match = VAL_NAME.match(name)
        if not match:
            raise UserError(f"{root.display(root.path('val', name))}: flat val images must be named like "
                            "ILSVRC2012_val_00000001.JPEG")
        number = int(match.group(1))
        if number not in labels:
            raise UserError(f"{root.display(root.path('val', name))} has no label in the ground truth "
                            f"({len(labels)} images labelled)")
        by_class.setdefault(labels[number], []).append(LabeledImage(f"val/{name}", labels[number]))
    return by_class


def read_imagenet(location: str) -> ImageNet:
    """Read and validate an ILSVRC-2012 root (a path or pyarrow URI). Paths in the result are
    relative to the root. Raises UserError naming the first problem: no ``train/`` or ``val/``,
    a class folder that is not a wnid, a class without images, flat validation images without
    their devkit labels, a validation class with no training folder."""
    root = Root(location, "ImageNet")
    root.required("train", "ILSVRC-2012 train/<wnid>/ folders")
    root.required("val", "ILSVRC-2012 val/ (wnid folders, or flat with the devkit)")
    train = _class_folders(root, "train")  # paths relative to the root, like train/n01440764/x.JPEG
    if not train:
        raise UserError(f"{root.display(root.path('train'))} holds no wnid folders; expected train/<wnid>/*.JPEG")
    empty = [wnid for wnid, images in train.items() if not images]
    if empty:
        raise UserError(f"{root.display(root.path('train', empty[0]))} holds no images (.JPEG, .jpg or .png)")
    val = _class_folders(root, "val")
    flat = [name for name, is_folder in root.entries(root.path("val")) if not is_folder and _is_image(name)]
    if not val and flat:
        val = _flat_val(root, flat)
    if not val:
        raise UserError(f"{root.display(root.path('val'))} holds no images; expected val/<wnid>/*.JPEG or the "
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
