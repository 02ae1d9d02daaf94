"""ILSVRC-2012 in its usual layout: ``ROOT/train/<wnid>/*.JPEG`` and ``ROOT/val/<wnid>/*.JPEG``.

The validation images are expected sorted into wnid folders (the layout that the common
``valprep`` script and most mirrors produce).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from itl_ray.datasets import IMAGE_SUFFIXES, LabeledImage, existing_dir, required
from itl_ray.errors import UserError


@dataclass(frozen=True)
class ImageNet:
    """Class wnids (sorted) and the train/val images, sorted by path within each class."""

    classes: tuple[str, ...]
    train: tuple[LabeledImage, ...]
    val: tuple[LabeledImage, ...]

    def train_by_class(self) -> dict[str, list[LabeledImage]]:
        by_class: dict[str, list[LabeledImage]] = {wnid: [] for wnid in self.classes}
        for image in self.train:
            by_class[image.label].append(image)
        return by_class


def _is_wnid(name: str) -> bool:
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def _class_folders(split_dir: Path) -> dict[str, list[LabeledImage]]:
    by_class: dict[str, list[LabeledImage]] = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if not entry.is_dir():
            continue
        if not _is_wnid(entry.name):
            raise UserError(f"{entry.path}: ImageNet class folders must be wnids like n01440764")
        files = sorted(
            f.name for f in os.scandir(entry.path) if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)
        )
        by_class[entry.name] = [LabeledImage(os.path.join(entry.path, name), entry.name) for name in files]
    return by_class


def read_imagenet(root: str | Path) -> ImageNet:
    """Read and validate an ILSVRC-2012 root."""
    root = existing_dir(root, "ImageNet")
    train_dir = required(root / "train", "ILSVRC-2012 train/<wnid>/ folders")
    val_dir = required(root / "val", "ILSVRC-2012 val/<wnid>/ folders")
    train = _class_folders(train_dir)
    val = _class_folders(val_dir)
    if not train:
        raise UserError(f"{train_dir} holds no wnid folders; expected train/<wnid>/*.JPEG")
    if not val:
        raise UserError(
            f"{val_dir} holds no wnid folders; expected val/<wnid>/*.JPEG (sort a flat val/ into "
            "class folders with the devkit's ground truth first)"
        )
    empty = [wnid for wnid, images in train.items() if not images]
    if empty:
        raise UserError(f"{train_dir / empty[0]} holds no images (.JPEG, .jpg or .png)")
    unknown = sorted(set(val) - set(train))
    if unknown:
        raise UserError(f"{val_dir / unknown[0]} is a val class with no train folder")
    classes = tuple(sorted(train))
    return ImageNet(
        classes=classes,
        train=tuple(image for wnid in classes for image in train[wnid]),
        val=tuple(image for wnid in classes for image in val.get(wnid, [])),
    )
