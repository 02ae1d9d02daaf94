"""Induction accuracy: do features learnt from coarse labels separate the fine classes they never
saw as labels? (the study's "fine vs coarse" question, e.g. pretrained on 127 classes, measured on
the 1000).

Definition (the study gives nearest neighbours on the penultimate features without further detail,
so the particulars are **assumptions**, each a setting):
1. Features: fc7 after relu7 and before drop7 (``AlexNet.penultimate``, the network in eval mode),
   of the center crop at the pretraining resolution of each image resized to ``short_side_for``
   of it (the validation transform of pretraining), L2-normalised, so a dot product is the cosine.
2. Memory: ``train_per_class`` (100) training images of each fine class of the trial's data,
   chosen by the nested, seeded ranking of ``subsets`` from the stage's seed (the same images for
   every trial with that seed, whatever it was pretrained on).
3. Each validation image of those classes scores every fine class by the mean cosine similarity of
   its ``k`` nearest training images *of that class* (k = 1: the class's nearest image). The class
   with the highest score is the prediction (k = 1: the class of the nearest neighbour, plain
   1-NN); top-5 counts an image right when its class is among the 5 highest scores, i.e., for
   k = 1, among the 5 distinct classes nearest to it. This per-class form (the local mean k-NN rule,
   Mitani and Hamamoto 2006) makes top-5 well defined for any k, where a vote among the k nearest
   would leave the classes outside them tied. Ties go to the class listed first (stable sort).
4. ``induction_top1`` and ``induction_top5``, percent of the validation images.

The reference: every trial with ``transfer.induction.enabled`` computes its own figure, the one
pretrained on ``fine`` included (where there is nothing to induce, a log line says so): the report
sets a coarse trial's figure against the fine trial's of the same seed ("within x% of full
training"); chance is 100 / classes (top-1).

Nearest neighbours by torch matrix products in chunks, not a library index: the memory is small
(100 images x 1000 classes), exact search is what the metric means, the per-class rule needs every
class's own nearest images (an index returns the k nearest overall), and torch runs the same code
on a GPU. Memory, real ImageNet (100 x 1000 training and 50,000 validation images, 4096-d):
the training features are kept, 100,000 x 4096 x 2 bytes (float16) = 819 MB (781 MiB); validation
features are classified batch by batch as they are extracted (all of them would be another
409.6 MB, 391 MiB, never held); a chunk of similarities is ``batch_size`` x ``classes_per_chunk``
x ``train_per_class`` float32 (256 x 100 x 100 x 4 bytes = 10 MB) plus the chunk's features
in float32 (100 x 100 x 4096 x 4 = 164 MB). Peak about 1 GB beside the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from itl_ray.bounds import Ge

from itl_ray import subsets
from itl_ray.errors import UserError
from itl_ray.images import SquareImages, center_crops, normalize, short_side_for
from itl_ray.models import AlexNet
from itl_ray.progress import Progress
from itl_ray.shards import Prepared
from itl_ray.transfer import StageOutput


@dataclass(frozen=True)
class InductionConfig:
    """Induction accuracy (module docstring): off unless ``enabled``."""

    enabled: bool = False
    # Training images per fine class in the nearest-neighbour memory.
    train_per_class: Annotated[int, Ge(1)] = 100
    k: Annotated[int, Ge(1)] = 1  # nearest training images per class whose mean similarity scores the class

    def check(self) -> None:
        """``k`` above ``train_per_class``: ValueError naming both."""
        if self.k > self.train_per_class:
            raise ValueError(f"k={self.k} is more than the {self.train_per_class} training images per class "
                             "(train_per_class)")


@dataclass(frozen=True)
class InductionRuntime:
    """How fast induction runs, not what it computes (the trial config's ``runtime.induction``; not
    part of ``trial_id``): features and similarities come out the same, to rounding, with any value."""

    batch_size: Annotated[int, Ge(1)] = 256  # images per forward pass
    classes_per_chunk: Annotated[int, Ge(1)] = 100  # classes per chunk of similarities (memory)


@dataclass(frozen=True)
class InductionData:
    """The stage's input: the fine classes and the images of the memory and of the test."""

    images: Prepared  # the prepared ImageNet (anything with read(rows) -> list of encoded images)
    classes: tuple[str, ...]  # the fine classes (wnids); labels index this tuple
    train_rows: np.ndarray  # the memory's rows (int64), class by class
    train_labels: np.ndarray  # their fine classes (int64)
    val_rows: np.ndarray  # the validation images of the classes (int64)
    val_labels: np.ndarray
    label_set: str  # what the network was pretrained on, for the log
    pretrained_groups: int  # classes it was pretrained on (0: not pretrained, random initialisation)


def induction_data(imagenet: Prepared, classes: Sequence[str], train_per_class: int, seed: int, label_set: str,
                   pretrained_groups: int) -> InductionData:
    """The memory (``train_per_class`` training images of each of ``classes``, nested and seeded as
    ``subsets.select`` chooses them: a class with fewer gives what it has) and the validation images
    of ``classes``. Raises UserError when a class has no training or the classes no validation image."""
    labels, sources = imagenet.column("label"), imagenet.column("source")
    index = {wnid: i for i, wnid in enumerate(classes)}
    train = np.array([row for row in imagenet.rows_in("train") if labels[row] in index], dtype=np.int64)
    missing = sorted(set(classes) - {labels[row] for row in train})
    if missing:
        raise UserError(f"induction: class {missing[0]} has no training images in {imagenet.folder}")
    most = max(np.unique([labels[row] for row in train], return_counts=True)[1])
    chosen = subsets.select([labels[row] for row in train], [subsets.image_key(sources[row]) for row in train],
                            None, min(train_per_class, int(most)), seed, "take_all", allowed=set(classes))
    rows = sorted(train[list(chosen.indices)], key=lambda row: index[labels[row]])  # class by class, stable
    val = np.array([row for row in imagenet.rows_in("val") if labels[row] in index], dtype=np.int64)
    if not len(val):
        raise UserError(f"induction: {imagenet.folder} has no validation images of the trial's classes")
    return InductionData(
        images=imagenet, classes=tuple(classes),
        train_rows=np.array(rows, dtype=np.int64), train_labels=np.array([index[labels[r]] for r in rows]),
        val_rows=val, val_labels=np.array([index[labels[row]] for row in val], dtype=np.int64),
        label_set=label_set, pretrained_groups=pretrained_groups,
    )


@torch.no_grad()
def fc7_features(model: AlexNet, images: SquareImages, device: torch.device, batch_size: int,
                 progress: Progress | None = None):
    """Yields (positions, features): for each batch of ``images`` (squares at ``short_side_for``
    of the model's resolution), its positions (int64) and the L2-normalised fc7 features of its
    center crops, float32 (B x embed_dim) on ``device``. The model must be in eval mode."""
    for start in range(0, len(images), batch_size):
        positions = torch.arange(start, min(len(images), start + batch_size))
        batch = normalize(center_crops(images[positions], model.resolution).to(device))
        yield positions, F.normalize(model.penultimate(batch).float(), dim=1)
        if progress is not None:
            progress.update(len(positions))


def class_scores(queries: torch.Tensor, memory: torch.Tensor, valid: torch.Tensor, k: int,
                 classes_per_chunk: int) -> torch.Tensor:
    """Per-class k-NN scores: for queries Q x D (L2-normalised) and a memory C x M x D (class c's
    training features in ``memory[c]``, L2-normalised; ``valid`` C x M marks the real ones of a
    class with fewer than M), the mean cosine similarity of each class's ``k`` most similar
    training features (fewer where the class has fewer): float32 Q x C, -inf for a class with none.
    Computed ``classes_per_chunk`` classes at a time (float32 products)."""
    count, size, dim = memory.shape
    scores = torch.empty((len(queries), count), dtype=torch.float32, device=queries.device)
    queries = queries.float()
    for first in range(0, count, classes_per_chunk):
        chunk = memory[first : first + classes_per_chunk].float()
        similarity = (queries @ chunk.reshape(-1, dim).T).view(len(queries), len(chunk), size)
        similarity = similarity.masked_fill(~valid[first : first + classes_per_chunk], -torch.inf)
        nearest = similarity.topk(min(k, size), dim=2).values  # Q x chunk x k
        real = torch.isfinite(nearest)
        total = torch.where(real, nearest, torch.zeros_like(nearest)).sum(2)
        found = real.sum(2)
        scores[:, first : first + len(chunk)] = torch.where(found > 0, total / found.clamp(min=1), -torch.inf)
    return scores


def ranked_classes(scores: torch.Tensor, top: int) -> torch.Tensor:
    """The ``top`` best classes of each row of ``scores`` (Q x C), best first; ties go to the lower
    class index (stable sort): int64 Q x min(top, C)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top]


def evaluate_induction(backbone: AlexNet, data: InductionData, config: InductionConfig, device: torch.device,
                       seed: int, log: Callable[[str], None] = print,
                       curve: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
                       runtime: InductionRuntime = InductionRuntime()) -> StageOutput:
    """Induction accuracy of ``backbone``'s fc7 features on ``data`` (module docstring): metrics
    ``induction_top1`` and ``induction_top5`` in percent of ``data``'s validation images; no
    per-image table and no curves. Nothing is drawn at random here (``seed`` chose the memory, in
    ``induction_data``). The backbone is used in eval mode and handed back unchanged."""
    device = torch.device(device)
    classes = len(data.classes)
    if data.pretrained_groups == 0:
        log("induction: the network was not pretrained (random initialisation): its figure is the floor")
    elif data.pretrained_groups >= classes:
        log(f"induction: label set {data.label_set} trains on the {classes} fine classes themselves, so there is "
            "nothing to induce; its figure is the reference for coarser label sets")
    side = short_side_for(backbone.resolution)
    threads = max(1, torch.get_num_threads())
    was_training = backbone.training
    backbone.eval()
    try:
        counts = np.bincount(data.train_labels, minlength=classes)
        size = int(counts.max())
        memory = torch.zeros((classes, size, backbone.embed_dim), dtype=torch.float16, device=device)
        valid = torch.zeros((classes, size), dtype=torch.bool, device=device)
        slot = np.concatenate([np.arange(count) for count in counts])  # rows are class by class
        labels = torch.from_numpy(data.train_labels)
        with SquareImages(data.images, data.train_rows, side, threads) as train:
            progress = Progress("induction: fc7 of the memory", len(train), log=log)
            for positions, features in fc7_features(backbone, train, device, runtime.batch_size, progress):
                where = torch.from_numpy(slot[positions.numpy()])
                memory[labels[positions], where] = features.half()
                valid[labels[positions], where] = True
            progress.close()
        top1 = top5 = 0
        truth = torch.from_numpy(data.val_labels)
        with SquareImages(data.images, data.val_rows, side, threads) as val:
            progress = Progress("induction: nearest neighbours of the validation images", len(val), log=log)
            for positions, features in fc7_features(backbone, val, device, runtime.batch_size, progress):
                best = ranked_classes(class_scores(features, memory, valid, config.k, runtime.classes_per_chunk),
                                      5).cpu()
                expected = truth[positions][:, None]
                top1 += int((best[:, :1] == expected).sum())
                top5 += int((best == expected).any(1).sum())
            progress.close()
    finally:
        backbone.train(was_training)
    metrics = {"induction_top1": 100 * top1 / len(data.val_rows), "induction_top5": 100 * top5 / len(data.val_rows)}
    log(f"induction: {data.label_set} network, {classes} fine classes, {len(data.train_rows):,} memory and "
        f"{len(data.val_rows):,} validation images, k={config.k}: top-1 {metrics['induction_top1']:.1f}%, top-5 "
        f"{metrics['induction_top5']:.1f}% (chance {100 / classes:.1f}%)")
    return StageOutput(metrics=metrics)
