"""SUN397 scene classification (SUN-CLS) on the official partitions: for each partition asked for,
fine-tune on its training images and classify its test images; report the SUN397 benchmark's
figure, the mean over scenes of the per-scene accuracy (Xiao et al. 2010 average the per-class
recognition rates), averaged over the partitions, with its standard deviation.

Images stream from the prepared shards batch by batch (``images.SquareImages``): a partition of real
SUN397 (19,850 training images at 256 px) would take 3.9 GB decoded; a set whose squares fit
``runtime.scene.cache_gib`` is decoded once instead.
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass
from typing import Annotated, Callable, Sequence

import pyarrow as pa
import torch
from itl_ray.bounds import Ge, Interval, MinLen

from itl_ray import metrics
from itl_ray.datasets.sun397 import PARTITIONS, SceneData, partition_name
from itl_ray.errors import UserError
from itl_ray.images import SquareImages, short_side_for
from itl_ray.models import AlexNet
from itl_ray.transfer import StageOutput
from itl_ray.transfer.finetune import FinetuneConfig, finetune, predict

CURVE = "scene"  # curves scene/loss and scene/lr


@dataclass(frozen=True)
class SceneConfig(FinetuneConfig):
    """Fine-tuning settings for SUN397, and the official partitions to run (1..10; the SUN397
    benchmark reports the mean and standard deviation over all ten)."""

    # Official train/test partitions, each fine-tuned on its own (Partitions/Training_NN.txt,
    # Testing_NN.txt).
    partitions: Annotated[tuple[Annotated[int, Interval(ge=PARTITIONS[0], le=PARTITIONS[-1])], ...],
                          MinLen(1)] = (1,)

    def check(self) -> None:
        """A partition listed twice: ValueError naming ``partitions``."""
        if len(set(self.partitions)) != len(self.partitions):
            raise ValueError(f"partitions lists a partition twice: {list(self.partitions)}")


@dataclass(frozen=True)
class SceneRuntime:
    """How fast the scene stage runs, not what it computes (the trial config's ``runtime.scene``;
    not part of ``trial_id``)."""

    # Decoded squares of a partition's images are kept in memory when they fit this many GiB (the
    # mini-benchmark's), else decoded batch by batch every epoch: the same pixels either way.
    cache_gib: Annotated[float, Ge(0)] = 1.0


def partition_seed(seed: int, partition: int) -> int:
    """The seed of one partition's fine-tuning, derived from the stage's: 63 bits of SHA-256 over
    ``"<seed>/partition_<NN>"`` (the same in every process)."""
    digest = hashlib.sha256(f"{int(seed)}/{partition_name(partition)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def evaluate_scene(backbone: AlexNet, data: Sequence[SceneData], config: SceneConfig, device: torch.device,
                   seed: int, log: Callable[[str], None] = print,
                   curve: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
                   runtime: SceneRuntime = SceneRuntime()) -> StageOutput:
    """SUN-CLS on each partition of ``data`` (one ``SceneData`` per partition, from
    ``datasets.sun397.scene_data``): fine-tune a copy of ``backbone`` (a new fc8 with one output per
    scene, every layer trained: ``finetune``) on the partition's training images, classify its
    test images. Images are resized so the shorter side is ``short_side_for(backbone.resolution)``
    px (256 at 227) and center-squared; random crops of the model's resolution in training, the
    center crop at test.

    Returns ``StageOutput`` with metrics in percent: ``sun397_acc``, the mean over partitions of
    the mean per-scene accuracy; ``sun397_acc_std``, their sample standard deviation (0 for one
    partition); ``sun397_acc/partition_NN`` for each; ``sun397_overall_acc``, the fraction of test
    images right, averaged over partitions. Per image: ``sun397_predictions`` (``image_id``,
    ``label``, ``prediction``: strings; one row per test image of each partition; with several
    partitions the id is ``partition_NN/<path>``, so an image tested in two partitions stays two
    rows). Partitions of the same size per scene (the release's) make the pooled mean per-scene
    accuracy of that table equal to ``sun397_acc``.

    Curves: ``scene/loss``, ``scene/lr`` per epoch, step = epoch counted on across partitions. Random
    draws come from ``partition_seed(seed, partition)``; torch's global generator is left as it was.
    The caller's backbone is not changed. Raises UserError for a partition without training or
    test images."""
    size = short_side_for(backbone.resolution)
    results: dict[int, tuple[float, float]] = {}
    rows: dict[str, list[str]] = {"image_id": [], "label": [], "prediction": []}
    for number, partition in enumerate(data):
        if not len(partition.train_rows) or not len(partition.test_rows):
            raise UserError(f"SUN397 partition {partition.partition} has no training or no test images")
        index = {scene: i for i, scene in enumerate(partition.classes)}
        threads = max(1, torch.get_num_threads())
        cache = int(runtime.cache_gib * 2**30)
        with SquareImages(partition.images, partition.train_rows, size, threads, cache) as train, \
                SquareImages(partition.images, partition.test_rows, size, threads, cache) as test:
            log(f"scene: partition {partition.partition}: {len(partition.classes)} scenes, {len(train):,} training "
                f"and {len(test):,} test images")
            train_y = torch.tensor([index[label] for label in partition.train_labels])
            model = finetune(backbone, train, train_y, len(partition.classes), config, device,
                             partition_seed(seed, partition.partition), log=log, task=CURVE, curve=curve,
                             first_step=number * config.epochs)
            predicted = predict(model, test, device).argmax(1).tolist()
        test_y = [index[label] for label in partition.test_labels]
        per_class = 100 * metrics.mean_per_class_accuracy(predicted, test_y)
        overall = 100 * metrics.accuracy(predicted, test_y)
        results[partition.partition] = (per_class, overall)
        log(f"scene: partition {partition.partition}: accuracy {per_class:.1f}% (mean per scene), "
            f"{overall:.1f}% overall")
        prefix = f"{partition_name(partition.partition)}/" if len(data) > 1 else ""
        rows["image_id"] += [prefix + image_id for image_id in partition.test_ids]
        rows["label"] += list(partition.test_labels)
        rows["prediction"] += [partition.classes[label] for label in predicted]
    accuracies = [per_class for per_class, _ in results.values()]
    scores = {
        "sun397_acc": statistics.fmean(accuracies),
        "sun397_acc_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "sun397_overall_acc": statistics.fmean(overall for _, overall in results.values()),
        **{f"sun397_acc/{partition_name(p)}": per_class for p, (per_class, _) in results.items()},
    }
    table = pa.table(rows, schema=pa.schema([("image_id", pa.string()), ("label", pa.string()),
                                             ("prediction", pa.string())]))
    return StageOutput(metrics=scores, per_image={"sun397_predictions": table})
