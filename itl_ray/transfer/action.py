"""VOC 2012 action classification (PASCAL-ACT-CLS): the person boxes are given; fine-tune on the
train persons, report the mean over the ten actions of the AP on the val persons (VOC 2012's
area-under-curve AP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable

import torch
from itl_ray.bounds import Ge

from itl_ray import metrics
from itl_ray.datasets.voc import ACTION_CLASSES, VocImage
from itl_ray.errors import UserError
from itl_ray.images import decode_rgb, resize_uint8, short_side_for
from itl_ray.models import AlexNet
from itl_ray.transfer.finetune import FinetuneConfig, finetune, predict


@dataclass(frozen=True)
class ActionConfig(FinetuneConfig):
    """Fine-tuning settings for VOC 2012 actions."""

    context: Annotated[float, Ge(1)] = 1.2  # the person box is enlarged by this factor around its centre


def person_crops(images: list[VocImage], size: int, context: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each annotated person as a ``size`` x ``size`` crop (box enlarged by ``context``), and a
    multi-hot matrix of its actions."""
    crops, targets = [], []
    for image in images:
        if not image.objects:
            continue
        pixels = decode_rgb(image.jpeg, image.image_id)
        height, width = pixels.shape[-2:]
        for person in image.objects:
            xmin, ymin, xmax, ymax = person.box
            cx, cy = (xmin + xmax) / 2 - 1, (ymin + ymax) / 2 - 1
            half_w, half_h = context * (xmax - xmin + 1) / 2, context * (ymax - ymin + 1) / 2
            x0, x1 = max(0, int(cx - half_w)), min(width, int(cx + half_w) + 1)
            y0, y1 = max(0, int(cy - half_h)), min(height, int(cy + half_h) + 1)
            crops.append(resize_uint8(pixels[:, y0:y1, x0:x1], size, size))
            targets.append([1.0 if action in person.actions else 0.0 for action in ACTION_CLASSES])
    if not crops:
        raise UserError("the VOC 2012 action split holds no annotated persons")
    return torch.stack(crops), torch.tensor(targets)


def evaluate_action(backbone: AlexNet, train: list[VocImage], val: list[VocImage], config: ActionConfig,
                    device: torch.device, seed: int, log: Callable[[str], None] = print,
                    curve: Callable[[dict[str, float], int], None] | None = None) -> dict[str, float]:
    """PASCAL-ACT-CLS: fine-tune a copy of ``backbone`` (multi-label, a new 10-way fc8, every layer
    trained: ``finetune``) on the persons of ``train``, score the persons of ``val``.

    Each person is cropped around its box enlarged by ``config.context`` and resized to
    ``short_side_for(backbone.resolution)`` px (random crops of the model's resolution in training,
    the center crop at test). Returns percent: ``voc12_act_map``, the mean over the actions with a
    val person of VOC 2012's AP (area under the precision envelope, the devkit's VOCevalaction),
    and ``voc12_act_ap/<action>`` for each of those actions; an action without val persons has no
    AP and is left out. The caller's backbone is not changed. Random draws: the order, crops and
    flips from ``seed``; the new fc8 and dropout from torch's global generator (which the trial
    seeds). ``curve`` gets ``action/loss`` and ``action/lr`` at step = epoch (``finetune``). Raises
    UserError when a split holds no annotated person."""
    size = short_side_for(backbone.resolution)
    train_x, train_y = person_crops(train, size, config.context)
    val_x, val_y = person_crops(val, size, config.context)
    model = finetune(backbone, train_x, train_y, len(ACTION_CLASSES), config, device, seed,
                     multi_label=True, log=log, task="action", curve=curve)
    scores = predict(model, val_x, device)
    aps = {
        action: metrics.average_precision(scores[:, column].numpy(), val_y[:, column].numpy(), eleven_point=False)
        for column, action in enumerate(ACTION_CLASSES)
    }
    result = {f"voc12_act_ap/{action}": 100 * ap for action, ap in aps.items() if ap == ap}
    result["voc12_act_map"] = 100 * metrics.mean_ap(aps.values())  # actions without val positives skipped
    return result
