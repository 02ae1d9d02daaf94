"""SUN397 in its release layout: ``ROOT/<letter>/<scene>/*.jpg`` with the official partitions
(``Partitions/ClassName.txt``, ``Training_NN.txt``, ``Testing_NN.txt``; NN = 01..10) unpacked into
``ROOT/Partitions``. Partition files list paths like ``/a/abbey/sun_aaalbzqrimafwbiv.jpg``.

Each official partition holds 50 training and 50 test images of each of the 397 scenes (Xiao et
al. 2010; torchvision's and VTAB's SUN397 readers pin these sizes). The reader warns about a
partition of other sizes (a subset, the generated mini-benchmark): its accuracy is not comparable
with published figures.

``scene_data`` reads one partition back from the prepared dataset as the scene stage takes it,
and ``check_partitions`` checks, before any trial starts, that a prepared folder holds the
partitions a trial asks for.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from itl_ray.datasets import LabeledImage, Root, read_lines
from itl_ray.errors import UserError
from itl_ray.shards import Prepared

PARTITIONS = range(1, 11)
SCENES = 397  # scene categories of the release (ClassName.txt)
IMAGES_PER_SCENE = 50  # per scene in each partition's training list, and in its test list


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


def partition_name(partition: int) -> str:
    """``partition_01`` for 1: the suffix of a partition's metric (``sun397_acc/partition_01``)."""
    return f"partition_{partition:02d}"


def size_problem(train_scenes: Iterable[str], test_scenes: Iterable[str]) -> str | None:
    """None when the training and test lists hold ``IMAGES_PER_SCENE`` images of each of
    ``SCENES`` scenes, as every official partition does; otherwise what they hold, e.g. "24
    scenes, 20 training and 20 test images per scene"."""
    train, test = Counter(train_scenes), Counter(test_scenes)
    scenes = set(train) | set(test)
    if len(scenes) == SCENES and all(train[s] == test[s] == IMAGES_PER_SCENE for s in scenes):
        return None

    def spread(counts: Counter) -> str:
        values = [counts[scene] for scene in scenes]
        low, high = min(values), max(values)
        return f"{low}" if low == high else f"{low}-{high}"

    return f"{len(scenes)} scenes, {spread(train)} training and {spread(test)} test images per scene"


def size_warning(partitions: Sequence[int], problem: str) -> str:
    """The warning line for partitions whose sizes are not the release's."""
    which = ", ".join(str(number) for number in partitions)
    return (f"warning: SUN397 partition {which}: {problem}, not the release's {IMAGES_PER_SCENE} training and "
            f"{IMAGES_PER_SCENE} test images of each of {SCENES} scenes: accuracies are not comparable with "
            "published SUN397 figures")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def read_sun397(location: str | Root, partition: int = 1, warn: Callable[[str], None] | None = _stderr) -> Sun397:
    """Validate the SUN397 release at ``location`` and list partition ``partition`` (1..10). Raises
    UserError naming the missing file, or the listed image whose scene or file does not exist.
    A partition that does not hold 50 training and 50 test images of each of the 397 scenes is
    read all the same, and ``warn`` (stderr by default; None: silent) gets one line saying so."""
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

    data = Sun397(classes=classes, train=split("Training"), test=split("Testing"))
    problem = size_problem((image.label for image in data.train), (image.label for image in data.test))
    if problem and warn is not None:
        warn(size_warning([partition], problem))
    return data


def prepared_partitions(data: Prepared) -> list[int]:
    """The partitions a prepared SUN397 folder holds (both its training and its test list)."""
    splits = {split for field in data.column("split") for split in field.split(",")}
    return [n for n in PARTITIONS if f"Training_{n:02d}" in splits and f"Testing_{n:02d}" in splits]


def check_partitions(data: Prepared, partitions: Sequence[int], setting: str = "data.sun397") -> None:
    """Raise UserError (one line naming ``setting``, the partition and what the folder holds) when
    a partition asked for is not 1..10 or is not in the prepared folder ``data``: the check a sweep
    makes before any trial starts."""
    held = prepared_partitions(data)
    for partition in partitions:
        if partition not in PARTITIONS:
            raise UserError(f"SUN397 partition {partition} does not exist: transfer.scene.partitions takes 1..10")
        if partition not in held:
            raise UserError(f"{setting}={data.folder} holds no partition {partition} (Training_{partition:02d}.txt / "
                            f"Testing_{partition:02d}.txt; it holds {', '.join(map(str, held)) or 'none'}): prepare "
                            "SUN397 with those partition files in ROOT/Partitions, or ask for transfer.scene.partitions "
                            "it holds")


@dataclass(frozen=True)
class SceneData:
    """One SUN397 partition as the scene stage takes it: where its images are and their scenes.
    Images are read by row, batch by batch (``images.read(rows)`` -> JPEG bytes), never all at once."""

    partition: int  # 1..10
    classes: tuple[str, ...]  # scene paths like "/a/abbey", sorted
    images: Prepared  # anything with read(rows) -> list of encoded images
    train_rows: np.ndarray  # rows of ``images`` (int64)
    train_labels: list[str]  # the scene of each training image
    test_rows: np.ndarray
    test_labels: list[str]
    test_ids: list[str]  # each test image's path inside the release, e.g. "a/abbey/sun_x.jpg"


def scene_data(data: Prepared, partition: int) -> SceneData:
    """One official SUN397 partition (Training_NN / Testing_NN, NN = ``partition``) of the prepared
    dataset ``data``: rows, scenes and ids (nothing is decoded here). Raises UserError when the
    partition is not in the folder (``check_partitions``)."""
    check_partitions(data, [partition])
    labels, sources = data.column("label"), data.column("source")
    train, test = data.rows_in(f"Training_{partition:02d}"), data.rows_in(f"Testing_{partition:02d}")
    return SceneData(
        partition=partition, classes=tuple(sorted(set(labels))), images=data,
        train_rows=train, train_labels=[labels[row] for row in train],
        test_rows=test, test_labels=[labels[row] for row in test], test_ids=[sources[row] for row in test],
    )
