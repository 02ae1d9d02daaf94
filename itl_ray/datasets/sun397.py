"""SUN397 in its release layout: ``ROOT/<letter>/<scene>/*.jpg`` with the official partitions
(``Partitions/ClassName.txt``, ``Training_NN.txt``, ``Testing_NN.txt``; NN = 01..10) unpacked into
``ROOT/Partitions``. Partition files list paths like ``/a/abbey/sun_aaalbzqrimafwbiv.jpg``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from itl_ray.datasets import LabeledImage, existing_dir, read_lines, required
from itl_ray.errors import UserError


@dataclass(frozen=True)
class Sun397:
    classes: tuple[str, ...]  # scene paths like "/a/abbey", in ClassName.txt order
    train: tuple[LabeledImage, ...]
    test: tuple[LabeledImage, ...]


def scene_of(relative_path: str) -> str:
    """``/a/abbey/sun_x.jpg`` -> ``/a/abbey``; scenes may have a sub-level (``/b/bakery/shop``)."""
    return relative_path.rsplit("/", 1)[0]


def read_sun397(root: str | Path, partition: int = 1) -> Sun397:
    root = existing_dir(root, "SUN397")
    if not 1 <= partition <= 10:
        raise UserError(f"SUN397 partition {partition} does not exist: use 1..10")
    partitions = required(root / "Partitions", "SUN397 Partitions/ (unzip Partitions.zip into the root)")
    classes = tuple(read_lines(required(partitions / "ClassName.txt", "Partitions/ClassName.txt")))
    known = set(classes)

    def split(kind: str) -> tuple[LabeledImage, ...]:
        listing = required(partitions / f"{kind}_{partition:02d}.txt", f"Partitions/{kind}_{partition:02d}.txt")
        images = []
        for line in read_lines(listing):
            scene = scene_of(line)
            if scene not in known:
                raise UserError(f"{listing} names {line}, whose scene is not in ClassName.txt")
            path = root / line.lstrip("/")
            if not path.is_file():
                raise UserError(f"{listing} names {line}, but {path} does not exist")
            images.append(LabeledImage(str(path), scene))
        return tuple(images)

    return Sun397(classes=classes, train=split("Training"), test=split("Testing"))
