"""SUN397 in its release layout: ``ROOT/<letter>/<scene>/*.jpg`` with the official partitions
(``Partitions/ClassName.txt``, ``Training_NN.txt``, ``Testing_NN.txt``; NN = 01..10) unpacked into
``ROOT/Partitions``. Partition files list paths like ``/a/abbey/sun_aaalbzqrimafwbiv.jpg``.

``scene_data`` reads one partition back from the prepared dataset as the scene stage takes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from itl_ray.datasets import LabeledImage, Root, read_lines
from itl_ray.errors import UserError
from itl_ray.shards import Prepared

PARTITIONS = range(1, 11)


@dataclass(frozen=True)
class Sun397:
    """One partition of SUN397 as the release lists it: the 397 scenes and the partition's
    training and test images (50 per scene each in the official partitions)."""

    classes: tuple[str, ...]  # scene paths like "/a/abbey", in ClassName.txt order
    train: tuple[LabeledImage, ...]  # paths inside the root, like a/abbey/sun_x.jpg
    test: tuple[LabeledImage, ...]


def scene_of(relative_path: str) -> str:
    """``/a/abbey/sun_x.jpg`` -> ``/a/abbey``; scenes may have a sub-level (``/b/bakery/shop``)."""
    return relative_path.rsplit("/", 1)[0]


def read_sun397(location: str | Root, partition: int = 1) -> Sun397:
    """Validate the SUN397 release at ``location`` and list partition ``partition`` (1..10). Raises
    UserError naming the missing file, or the listed image whose scene or file does not exist."""
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


@dataclass(frozen=True)
class SceneData:
    """One SUN397 partition as the scene stage takes it: encoded images and their scenes."""

    classes: tuple[str, ...]  # scene paths like "/a/abbey", sorted
    train_images: list[bytes]  # stored JPEG bytes
    train_labels: list[str]  # the scene of each training image
    test_images: list[bytes]
    test_labels: list[str]


def partition_rows(data: Prepared, partition: int) -> tuple[np.ndarray, np.ndarray]:
    """Manifest rows of the training and test images of official partition ``partition``
    (Training_NN / Testing_NN, NN = ``partition``) of the prepared SUN397 dataset ``data``. Raises
    UserError when the partition has no training or no test images (it was not prepared); the
    trial checks this before any training."""
    train, test = data.rows_in(f"Training_{partition:02d}"), data.rows_in(f"Testing_{partition:02d}")
    if not len(train) or not len(test):
        raise UserError(f"data.sun397_partition={partition}: {data.folder} has no images in partition {partition} "
                        f"(Training_{partition:02d}.txt / Testing_{partition:02d}.txt were not prepared); "
                        "choose a partition it holds")
    return train, test


def scene_data(data: Prepared, partition: int) -> SceneData:
    """One official SUN397 partition (``partition_rows``) read from the prepared dataset ``data``,
    images as stored JPEG bytes. Raises UserError when the partition has no training or no test
    images (it was not prepared)."""
    labels = data.column("label")
    train, test = partition_rows(data, partition)
    return SceneData(
        classes=tuple(sorted(set(labels))),
        train_images=data.read(train), train_labels=[labels[row] for row in train],
        test_images=data.read(test), test_labels=[labels[row] for row in test],
    )
