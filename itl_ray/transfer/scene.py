"""SUN397 scene classification (SUN-CLS): fine-tune on a partition's training images, report
accuracy on its test images (mean of the per-scene accuracies, SUN397's usual figure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from itl_ray import metrics
from itl_ray.datasets.sun397 import SceneData
from itl_ray.images import load_squares, short_side_for
from itl_ray.models import AlexNet
from itl_ray.transfer.finetune import FinetuneConfig, finetune, predict


@dataclass(frozen=True)
class SceneConfig(FinetuneConfig):
    """Fine-tuning settings for SUN397."""


def evaluate_scene(backbone: AlexNet, data: SceneData, config: SceneConfig, device: torch.device, seed: int,
                   log: Callable[[str], None] = print,
                   curve: Callable[[dict[str, float], int], None] | None = None) -> dict[str, float]:
    """SUN-CLS: fine-tune a copy of ``backbone`` (a new fc8 with one output per scene, every layer
    trained: ``finetune``) on the partition's training images, classify its test images.

    Images are resized so the shorter side is ``short_side_for(backbone.resolution)`` px and
    center-squared (random crops of the model's resolution in training, the center crop at test).
    Returns percent: ``sun397_acc``, the mean over scenes of the per-scene accuracy (the usual
    SUN397 figure: Xiao et al. 2010 average the per-class recognition rates). The caller's backbone
    is not changed. Random draws: the order, crops and flips from ``seed``; the new fc8 and dropout
    from torch's global generator (which the trial seeds). ``curve`` gets ``scene/loss`` and
    ``scene/lr`` at step = epoch (``finetune``)."""
    index = {scene: i for i, scene in enumerate(data.classes)}
    size = short_side_for(backbone.resolution)
    train_x = load_squares(data.train_images, size)
    train_y = torch.tensor([index[label] for label in data.train_labels])
    test_x = load_squares(data.test_images, size)
    test_y = torch.tensor([index[label] for label in data.test_labels])
    model = finetune(backbone, train_x, train_y, len(data.classes), config, device, seed, log=log, task="scene",
                     curve=curve)
    predictions = predict(model, test_x, device).argmax(1)
    return {"sun397_acc": 100 * metrics.mean_per_class_accuracy(predictions.numpy(), test_y.numpy())}
