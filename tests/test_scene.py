"""The SUN397 scene stage: a partition read back from the prepared mini-benchmark as the release's
partition files list it, and fine-tuning on a small constructed set of easy scenes (each its own
colour field) that the network then tells apart."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itl_ray.datasets.sun397 import SceneData, read_sun397, scene_data
from itl_ray.errors import UserError
from itl_ray.models import AlexNet
from itl_ray.shards import Prepared
from itl_ray.transfer.scene import SceneConfig, evaluate_scene

CPU = torch.device("cpu")
SCENES = {"/a/abbey": (200, 60, 50), "/b/beach": (60, 190, 80), "/c/canyon": (60, 80, 200)}


def scene_images(per_scene: int, seed: int) -> tuple[list[bytes], list[str]]:
    """JPEGs of a scene's colour with noise and a grey blob, at several sizes; their scenes."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index in range(per_scene):
        for scene, colour in SCENES.items():
            height, width = int(rng.integers(56, 80)), int(rng.integers(56, 96))
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
            top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
            pixels[top : top + height // 3, left : left + width // 3] = 128
            encoded = io.BytesIO()
            Image.fromarray(pixels).save(encoded, format="JPEG", quality=90)
            images.append(encoded.getvalue())
            labels.append(scene)
    return images, labels


def test_fine_tuning_tells_the_scenes_apart():
    train_images, train_labels = scene_images(8, seed=0)
    test_images, test_labels = scene_images(5, seed=1)
    data = SceneData(tuple(SCENES), train_images, train_labels, test_images, test_labels)
    config = SceneConfig(epochs=10, batch_size=8, lr=0.003)

    def accuracy(config):
        torch.manual_seed(0)
        backbone = AlexNet(num_classes=10, width=0.125, resolution=48)
        return evaluate_scene(backbone, data, config, CPU, seed=0, log=lambda line: None)["sun397_acc"]

    assert accuracy(config) == pytest.approx(100.0)  # chance: 33.3
    assert accuracy(SceneConfig(epochs=0)) < 70  # a new fc8 and no fine-tuning: one scene for all


def test_a_prepared_partition_is_the_release_partition(mini_paths, raw_paths):
    data = Prepared(mini_paths["sun397"], "sun397")
    partition = scene_data(data, 1)
    release = read_sun397(raw_paths["sun397"], 1)
    assert partition.classes == tuple(sorted(release.classes))
    assert partition.train_labels == [image.label for image in sorted(release.train, key=lambda i: i.path)]
    assert partition.test_labels == [image.label for image in sorted(release.test, key=lambda i: i.path)]
    # The stored bytes are the images the manifest names, in the same order.
    sources = data.column("source")
    train_rows = data.rows_in("Training_01")
    assert [sources[row] for row in train_rows] == sorted(image.path for image in release.train)
    assert partition.train_images == data.read(train_rows)
    root = Path(raw_paths["sun397"])
    assert len(partition.train_images) == len(release.train) and (root / release.train[0].path).is_file()


def test_a_partition_that_was_not_prepared_is_a_user_error(mini_paths):
    data = Prepared(mini_paths["sun397"], "sun397")
    with pytest.raises(UserError, match=r"data\.sun397_partition=11: .*sun397 has no images in partition 11 "
                                        r"\(Training_11\.txt / Testing_11\.txt were not prepared\); choose a partition"):
        scene_data(data, 11)
