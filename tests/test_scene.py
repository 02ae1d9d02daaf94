"""The SUN397 scene stage: partitions read back from the prepared mini-benchmark as the release's
partition files list them; fine-tuning on a small constructed set of easy scenes (each its own
colour field) that the network then tells apart; several partitions reported as the benchmark
reports them (mean and standard deviation of the mean per-scene accuracy); per-image predictions
that reproduce the metric; images streamed batch by batch; partitions checked before any trial."""

from __future__ import annotations

import io
import shutil
import statistics
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from itl_ray.config import load_spec
from itl_ray.datasets.sun397 import (IMAGES_PER_SCENE, SCENES, SceneData, check_partitions, prepared_partitions,
                                     read_sun397, scene_data, size_problem)
from itl_ray.errors import UserError
from itl_ray.images import SquareImages, load_squares
from itl_ray.metrics import mean_per_class_accuracy
from itl_ray.models import AlexNet
from itl_ray.prepare import prepare
from itl_ray.shards import Prepared
from itl_ray.transfer.scene import SceneConfig, SceneRuntime, evaluate_scene
from tests.conftest import tiny_spec
from tests.test_cli import assert_one_line_error, itl_ray

CPU = torch.device("cpu")
SCENE_COLOURS = {"/a/abbey": (200, 60, 50), "/b/beach": (60, 190, 80), "/c/canyon": (60, 80, 200)}


class Encoded:
    """Encoded images held in memory, read by row as a prepared dataset is; counts what was read."""

    def __init__(self, blobs: list[bytes]):
        self.blobs, self.reads = blobs, []

    def read(self, rows):
        self.reads.append(len(rows))
        return [self.blobs[row] for row in rows]


def scene_images(per_scene: int, seed: int) -> tuple[list[bytes], list[str]]:
    """JPEGs of a scene's colour with noise and a grey blob, at several sizes; their scenes."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index in range(per_scene):
        for scene, colour in SCENE_COLOURS.items():
            height, width = int(rng.integers(56, 80)), int(rng.integers(56, 96))
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)
            top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
            pixels[top : top + height // 3, left : left + width // 3] = 128
            encoded = io.BytesIO()
            Image.fromarray(pixels).save(encoded, format="JPEG", quality=90)
            images.append(encoded.getvalue())
            labels.append(scene)
    return images, labels


def constructed_partition(partition: int, train_per_scene: int = 8, test_per_scene: int = 5) -> SceneData:
    train_images, train_labels = scene_images(train_per_scene, seed=partition)
    test_images, test_labels = scene_images(test_per_scene, seed=100 + partition)
    images = Encoded(train_images + test_images)
    train_rows = np.arange(len(train_images))
    test_rows = np.arange(len(train_images), len(train_images) + len(test_images))
    return SceneData(partition, tuple(SCENE_COLOURS), images, train_rows, train_labels, test_rows, test_labels,
                     [f"x/{partition}/{i}.jpg" for i in range(len(test_labels))])


def scene(data, config, seed=0, runtime=SceneRuntime()):
    torch.manual_seed(0)
    backbone = AlexNet(num_classes=10, width=0.125, resolution=48, init="kaiming")
    curves = []
    output = evaluate_scene(backbone, data, config, CPU, seed=seed, log=lambda line: None,
                            curve=lambda metrics, step: curves.append((step, metrics)), runtime=runtime)
    return output, curves


def test_fine_tuning_tells_the_scenes_apart():
    config = SceneConfig(epochs=10, batch_size=8, lr=0.003)
    output, curves = scene([constructed_partition(1)], config)
    assert output.metrics["sun397_acc"] == pytest.approx(100.0)  # chance: 33.3
    assert output.metrics["sun397_acc/partition_01"] == output.metrics["sun397_acc"]
    assert output.metrics["sun397_overall_acc"] == pytest.approx(100.0) and output.metrics["sun397_acc_std"] == 0.0
    assert [step for step, _ in curves] == list(range(1, 11))
    assert set(curves[0][1]) == {"scene/loss", "scene/lr"} and curves[-1][1]["scene/loss"] < curves[0][1]["scene/loss"]
    table = output.per_image["sun397_predictions"]
    assert table.column_names == ["image_id", "label", "prediction"]
    assert table.column("image_id").to_pylist()[:2] == ["x/1/0.jpg", "x/1/1.jpg"]  # one partition: the plain path
    assert table.column("label").to_pylist() == table.column("prediction").to_pylist()
    untrained, _ = scene([constructed_partition(1)], SceneConfig(epochs=0))
    assert untrained.metrics["sun397_acc"] < 70  # a new fc8 and no fine-tuning: one scene for all


def test_several_partitions_give_the_mean_and_standard_deviation():
    config = SceneConfig(epochs=2, batch_size=8, lr=0.003, partitions=(1, 2, 3))
    data = [constructed_partition(p, train_per_scene=4, test_per_scene=6) for p in (1, 2, 3)]
    output, curves = scene(data, config)
    each = [output.metrics[f"sun397_acc/partition_{p:02d}"] for p in (1, 2, 3)]
    assert output.metrics["sun397_acc"] == pytest.approx(statistics.fmean(each))
    assert output.metrics["sun397_acc_std"] == pytest.approx(statistics.stdev(each))
    assert [step for step, _ in curves] == [1, 2, 3, 4, 5, 6]  # epochs counted on across partitions
    table = output.per_image["sun397_predictions"].to_pydict()
    assert len(table["image_id"]) == 3 * 18 and table["image_id"][0] == "partition_01/x/1/0.jpg"
    assert len(set(table["image_id"])) == len(table["image_id"])
    # Partitions with the same number of test images per scene: the pooled mean per-scene accuracy
    # of the table is the logged figure (what the report's resampling starts from).
    scenes = sorted(set(table["label"]))
    pooled = mean_per_class_accuracy([scenes.index(s) for s in table["prediction"]],
                                     [scenes.index(s) for s in table["label"]])
    assert 100 * pooled == pytest.approx(output.metrics["sun397_acc"], abs=1e-9)
    again, _ = scene(data, config)
    assert again.metrics == output.metrics  # each partition's draws come from the stage's seed


def test_images_stream_batch_by_batch():
    """Without a cache, no read asks for more than one batch, and the squares are load_squares'."""
    data = constructed_partition(1)
    config = SceneConfig(epochs=2, batch_size=8, lr=0.003)
    scene([data], config, runtime=SceneRuntime(cache_gib=0.0))
    assert data.images.reads and max(data.images.reads) <= 256  # training batches of 8, test batches of 256
    assert max(data.images.reads[: 2 * 3]) <= 8
    rows = data.train_rows
    squares = SquareImages(data.images, rows, 54, threads=2)
    expected = load_squares(data.images.read(rows), 54)
    assert torch.equal(squares[torch.tensor([5, 0, 7])], expected[[5, 0, 7]])
    assert torch.equal(squares[0:4], expected[:4])
    squares.close()
    cached = SquareImages(data.images, rows, 54, cache_bytes=2**30)
    before = len(data.images.reads)
    assert torch.equal(cached[torch.tensor([3])], expected[[3]]) and torch.equal(cached[1:2], expected[1:2])
    assert data.images.reads[before:] == [len(rows)]  # decoded once, kept


def test_a_prepared_partition_is_the_release_partition(mini_paths, raw_paths):
    data = Prepared(mini_paths["sun397"], "sun397")
    assert prepared_partitions(data) == list(range(1, 11))
    partition = scene_data(data, 3)
    release = read_sun397(raw_paths["sun397"], 3, warn=None)
    assert partition.partition == 3 and partition.classes == tuple(sorted(release.classes))
    assert partition.train_labels == [image.label for image in sorted(release.train, key=lambda i: i.path)]
    assert partition.test_labels == [image.label for image in sorted(release.test, key=lambda i: i.path)]
    assert partition.test_ids == sorted(image.path for image in release.test)
    sources = data.column("source")
    assert [sources[row] for row in partition.train_rows] == sorted(image.path for image in release.train)
    assert (Path(raw_paths["sun397"]) / release.train[0].path).is_file()


def test_the_reader_warns_about_partitions_unlike_the_releases(raw_paths):
    lines = []
    release = read_sun397(raw_paths["sun397"], 1, warn=lines.append)
    per_scene = len(release.train) // len(release.classes)
    assert lines == [f"warning: SUN397 partition 1: {len(release.classes)} scenes, {per_scene} training and "
                     f"{per_scene} test images per scene, not the release's 50 training and 50 test images of each of "
                     "397 scenes: accuracies are not comparable with published SUN397 figures"]
    scenes = [f"/s/scene_{i}" for i in range(SCENES)]
    assert size_problem(scenes * IMAGES_PER_SCENE, scenes * IMAGES_PER_SCENE) is None  # the release's sizes
    assert size_problem(scenes * 50, scenes * 49 + scenes[:10]) == "397 scenes, 50 training and 49-50 test images " \
                                                                   "per scene"


def test_partitions_are_checked_before_any_trial(tmp_path, mini, mini_paths):
    with pytest.raises(UserError, match=r"transfer\.scene\.partitions\[1\]=11 is out of range; allowed: >= 1 and <= 10"):
        load_spec(tiny_spec(tmp_path / "s.yaml", mini_paths), {"transfer.scene.partitions": [1, 11]})
    with pytest.raises(UserError, match="partitions lists a partition twice"):
        load_spec(tiny_spec(tmp_path / "s.yaml", mini_paths), {"transfer.scene.partitions": [2, 2]})
    # A folder prepared with partition 1 only (the release's other partition files absent).
    sun = tmp_path / "sun"
    shutil.copytree(mini / "SUN397", sun)
    for number in range(2, 11):
        (sun / "Partitions" / f"Training_{number:02d}.txt").unlink()
    prepare("sun397", str(sun), tmp_path / "sun-prepared", workers=1)
    held = Prepared(tmp_path / "sun-prepared", "sun397")
    assert prepared_partitions(held) == [1]
    with pytest.raises(UserError, match=r"data.sun397=.* holds no partition 2 .*it holds 1\)"):
        check_partitions(held, [1, 2])
    spec = tiny_spec(tmp_path / "t.yaml", {**mini_paths, "sun397": str(tmp_path / "sun-prepared")},
                     extra=f"storage: {tmp_path / 'runs'}")
    done = itl_ray("sweep", str(spec), "--set", "transfer.scene.partitions=[1,2]", cwd=tmp_path)
    assert_one_line_error(done, "holds no partition 2", "transfer.scene.partitions")
    assert not (tmp_path / "itl_runs").exists() and not (tmp_path / "runs").exists()


def test_the_trial_writes_the_predictions(tmp_path, mini_paths):
    """The scene stage's per-image table, as the trial writes it, reproduces the logged metric."""
    from itl_ray.trial import run_trial

    config = load_spec(tiny_spec(tmp_path / "s.yaml", mini_paths), {
        "transfer.detection.epochs": 0, "transfer.action.epochs": 0, "transfer.scene.partitions": [2, 5]}).trials()[1]
    final = run_trial(config, tmp_path / "work", lambda *report: None, log=lambda line: None)
    table = pq.read_table(tmp_path / "work" / "per_image" / "sun397_predictions.parquet").to_pydict()
    assert {image_id.split("/")[0] for image_id in table["image_id"]} == {"partition_02", "partition_05"}
    scenes = sorted(set(table["label"]))
    pooled = mean_per_class_accuracy([scenes.index(s) for s in table["prediction"]],
                                     [scenes.index(s) for s in table["label"]])
    assert 100 * pooled == pytest.approx(final["sun397_acc"], abs=1e-9)
    assert final["sun397_acc"] == pytest.approx((final["sun397_acc/partition_02"] + final["sun397_acc/partition_05"]) / 2)


def test_a_partition_that_was_not_prepared_is_a_user_error(mini_paths):
    data = Prepared(mini_paths["sun397"], "sun397")
    with pytest.raises(UserError, match=r"SUN397 partition 11 does not exist: transfer\.scene\.partitions takes "
                                        r"1\.\.10"):
        scene_data(data, 11)
