"""SUN397 in its release layout: ``ROOT/<letter>/<scene>/*.jpg`` with the official partitions
(``Partitions/ClassName.txt``, ``Training_NN.txt``, ``Testing_NN.txt``; NN = 01..10) unpacked into
``ROOT/Partitions``. Partition files list paths like ``/a/abbey/sun_aaalbzqrimafwbiv.jpg``.
"""

from __future__ import annotations

from dataclasses import dataclass

from itl_ray.datasets import LabeledImage, Root, read_lines
from itl_ray.errors import UserError

PARTITIONS = range(1, 11)


@dataclass(frozen=True)
class Sun397:
    classes: tuple[str, ...]  # scene paths like "/a/abbey", in ClassName.txt order
    train: tuple[LabeledImage, ...]  # paths inside the root, like a/abbey/sun_x.jpg
    test: tuple[LabeledImage, ...]


def scene_of(relative_path: str) -> str:
    """``/a/abbey/sun_x.jpg`` -> ``/a/abbey``; scenes may have a sub-level (``/b/bakery/shop``)."""
    return relative_path.rsplit("/", 1)[0]


def read_sun397(location: str | Root, partition: int = 1) -> Sun397:
    root = location if isinstance(location, Root) else Root(location, "SUN397")
    if partition not in PARTITIONS:
        raise UserError(f"SUN397 partition {partition} does not exist: use 1..10")
    root.required("Partitions", "SUN397 Partitions/ (unzip Partitions.zip into the root)")
    classes = tuple(read_lines(root.read_text(root.required("Partitions/ClassName.txt", "Partitions/ClassName.txt"))))
    known = set(classes)
    files = root.files_under("")

    def split(kind: str) -> tuple[LabeledImage, ...]:
        name = f"Partitions/{kind}_{partition:02d}.txt"
        listing = root.display(root.required(name, name))
        images = []
        for line in read_lines(root.read_text(root.path(name))):
            scene = scene_of(line)
            if scene not in known:
                raise UserError(f"{listing} names {line}, whose scene is not in ClassName.txt")
            path = line.lstrip("/")
            if path not in files:
                raise UserError(f"{listing} names {line}, but {root.display(root.path(path))} does not exist")
            images.append(LabeledImage(path, scene))
        return tuple(images)

    return Sun397(classes=classes, train=split("Training"), test=split("Testing"))
