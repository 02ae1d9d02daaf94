"""PASCAL-ACT-CLS: VOC 2012 action classification of given person boxes, as R*CNN's primary-region
model (Gkioxari, Girshick, Malik, "Contextual Action Recognition with R*CNN", ICCV 2015, without
its secondary regions: the released code's models/VGG16 baseline, with the study's AlexNet).

The person boxes are given; the network is trained on the persons of VOC 2012 action train and
scored on those of val. ``evaluate_action`` (``model: rstar_primary``, the default):

1. The whole image, scaled as Fast R-CNN scales it (shorter side 600 px, longer at most 1000), goes
   through conv1..conv5; each person box is RoI max-pooled to pool5's grid and goes through the
   pretrained fc6 and fc7 (``regions.RegionNetwork``, with their dropout), then a new action
   classifier.
2. The classifier is R*CNN's softmax over the ten actions plus ``other`` (the released code's
   lib/datasets/pascal_voc.py ``_classes``, 11 outputs in models/VGG16/train.prototxt
   ``cls_score``, ``SoftmaxWithLoss``); a person is labelled with its first action in that order,
   ``other`` when it has none of the ten. A person's score for an action is that action's softmax
   probability (lib/fast_rcnn/test_vanilla.py writes ``cls_prob``). Setting ``head: binary``
   trains ten per-action logistic outputs instead (a person may have several actions).
3. Training (R*CNN's solver and config, from Fast R-CNN's): SGD steps on 2 images each (flipped at
   random), up to 15 regions per image that overlap one of its person boxes by IoU >= 0.5 (each
   labelled with that person's action), the learning rate divided by 10 once; conv1 frozen,
   biases at twice the rate and without decay, as in Fast R-CNN's CaffeNet.
4. Test: every val person; per action, VOC 2012's AP (area under the precision envelope, the
   devkit's VOCevalaction) over all persons, mean over the actions that have a positive.

Persons whose only flag is ``other`` are negatives for every action (the devkit scores every
annotated person of the split for every action). An image without any person box has nothing to
train or score: it is left out and counted in the log.

=========================  =====================  =================================================
setting                    default                source
=========================  =====================  =================================================
image_size, max_size       600, 1000 px           RstarCNN lib/fast_rcnn/config.py ``TRAIN.SCALES``
                                                  (line 43), ``TRAIN.MAX_SIZE`` (46), ``TEST.*``
iterations                 40,000                 RstarCNN README: trained model ``..._iter_40000``
lr, lr_step                0.0001, / 10 at 30,000  RstarCNN models/VGG16/solver.prototxt
                                                  ``base_lr: 0.0001``, ``stepsize: 30000``,
                                                  ``gamma: 0.1``
momentum, weight_decay     0.9, 0.0005            the same solver.prototxt
images_per_batch           2                      RstarCNN config.py ``TRAIN.IMS_PER_BATCH`` (49)
rois_per_batch             30 (15 per image)      config.py ``TRAIN.BATCH_SIZE`` (52), all foreground:
region_iou                 0.5                    ``TRAIN.FG_FRACTION = 1`` (55), ``TRAIN.FG_THRESH``
                                                  (58); lib/data_layer/minibatch.py ``_sample_rois``
flip_probability           0.5                    config.py ``TRAIN.USE_FLIPPED`` (73)
bias multipliers           lr 2, decay 0          models/VGG16/train.prototxt (every trained layer)
frozen_convs               1 (conv1)              Fast R-CNN's CaffeNet train.prototxt (R*CNN's VGG16
                                                  freezes the first convolutions the same way)
roi_pool                   max, pool5's grid      train.prototxt ``roi_pool5`` (spatial_scale 1/16)
head                       softmax, 11-way        pascal_voc.py ``_classes``; train.prototxt
(new layer)                N(0, 0.01), bias 0     train.prototxt ``cls_score`` fillers, on fc7
=========================  =====================  =================================================

**Assumptions**: R*CNN draws its training regions from the person boxes and the Selective Search
boxes that overlap them by IoU >= 0.5; VOC 2012 action proposals are not prepared here, so the
regions around each person are drawn at random instead (``regions: jitter``, see
``training_regions``: centre moved by up to a quarter of the box, sides scaled by 0.7-1.4, kept
at IoU >= 0.5); ``regions: box`` trains on the given boxes alone. ``model: crops`` keeps the
earlier model: each person box enlarged by ``crops.context``, cropped and resized to the
backbone's input, the whole network fine-tuned as a multi-label classifier
(``finetune.finetune``); it holds every person crop in memory. ``conv_lr_scale`` and
``head_lr_scale`` multiply the convolutions' and the new classifier's rates (1 in the recipe).

Outputs: ``voc12_act_map`` and ``voc12_act_ap/<action>`` in percent, and the per-image table
``voc12_act_scores`` (one row per val person and action: image id, person index within the
image, action, score, label).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from itl_ray.bounds import Ge, Gt, Interval
from torch import nn

from itl_ray import metrics
from itl_ray.datasets.voc import ACTION_CLASSES, VocImage, VocSplit, VocSplits
from itl_ray.errors import UserError
from itl_ray.metrics import box_iou
from itl_ray.images import decode_rgb, resize_uint8, short_side_for
from itl_ray.models import AlexNet
from itl_ray.progress import Progress
from itl_ray.transfer import Curve, StageOutput, no_curve
from itl_ray.transfer.finetune import FinetuneConfig, finetune, predict
from itl_ray.transfer.image_stream import ImageStream, default_workers
from itl_ray.transfer.regions import (RegionNetwork, RegionRecipe, Schedule, caffe_sgd, child_generator, flip_boxes,
                                      image_batch, schedule, set_lr, training_plan)

JITTER_DRAWS = 16  # candidate boxes drawn around each person per visit (those at region_iou or more are kept)
OTHER = len(ACTION_CLASSES)  # the softmax head's class index of "other" (none of the ten actions)
DISPLAY_EVERY = 20  # iterations between two points of the training curves (solver.prototxt display: 20)


@dataclass(frozen=True)
class CropsConfig(FinetuneConfig):
    """``model: crops``: fine-tuning on person crops (``FinetuneConfig``'s recipe, an assumption)."""

    context: Annotated[float, Ge(1)] = 1.2  # the person box is enlarged by this factor around its centre


@dataclass(frozen=True)
class ActionConfig(RegionRecipe):
    """VOC 2012 actions: R*CNN's primary-region recipe (sources: the module docstring's table); the
    schedule, SGD and image settings of ``RegionRecipe`` with R*CNN's learning rate."""

    model: Literal["rstar_primary", "crops"] = "rstar_primary"
    head: Literal["softmax", "binary"] = "softmax"  # softmax (10 actions + other) or binary (10 logistic outputs)
    lr: Annotated[float, Gt(0)] = 0.0001
    # Training regions: jitter (boxes around each person) or box (the person boxes only).
    regions: Literal["jitter", "box"] = "jitter"
    rois_per_batch: Annotated[int, Ge(1)] = 30  # training regions per SGD step, split evenly over its images
    region_iou: Annotated[float, Interval(gt=0, le=1)] = 0.5  # a training region overlaps a person box by at least this IoU
    crops: CropsConfig = field(default_factory=CropsConfig)

    def check(self) -> None:
        """``RegionRecipe.check`` and ``rois_per_batch`` a multiple of ``images_per_batch``
        (bounds and choices are declared on the fields): ValueError naming the fields."""
        super().check()
        if self.rois_per_batch % self.images_per_batch:
            raise ValueError(f"rois_per_batch ({self.rois_per_batch}) must be a multiple of images_per_batch "
                             f"({self.images_per_batch})")


@dataclass(frozen=True)
class ActionRuntime:
    """How fast the action stage runs, not what it computes (the trial config's
    ``runtime.action``; not part of ``trial_id``)."""

    # Image decoding threads (``image_stream.ImageStream``); 0: ``image_stream.default_workers``
    # (a GPU: all cores but two; a CPU: one). Images arrive in the same order with any number.
    workers: Annotated[int, Ge(0)] = 0


def persons(image: VocImage) -> list:
    """The person boxes of an image, in annotation order (their index is the person's number)."""
    return [obj for obj in image.objects if obj.name == "person"]


def action_targets(image: VocImage) -> torch.Tensor:
    """Persons x 10 multi-hot actions of an image's persons (a person flagged only ``other`` has
    none)."""
    return torch.tensor([[1.0 if action in person.actions else 0.0 for action in ACTION_CLASSES]
                         for person in persons(image)]).reshape(-1, len(ACTION_CLASSES))


def softmax_labels(targets: torch.Tensor) -> torch.Tensor:
    """R*CNN's single label per person: the first of its actions in ``ACTION_CLASSES`` order, or
    ``OTHER`` (10) when it has none."""
    flagged = targets > 0
    first = flagged.float().argmax(dim=1)
    return torch.where(flagged.any(dim=1), first, torch.full_like(first, OTHER))


def _boxes(image: VocImage) -> torch.Tensor:
    """An image's person boxes as 0-based pixel indices of the stored image (P x 4 float32)."""
    return torch.tensor([[value - 1 for value in person.box] for person in persons(image)],
                        dtype=torch.float32).reshape(-1, 4)


class PrimaryRegion(nn.Module):
    """The region network and a new action classifier on its fc7 (11 or 10 outputs, N(0, 0.01), bias 0).
    ``forward(images, rois)``: logits K x outputs."""

    def __init__(self, network: RegionNetwork, outputs: int, generator: torch.Generator):
        super().__init__()
        self.network = network
        self.classifier = nn.Linear(network.embed_dim, outputs)
        nn.init.normal_(self.classifier.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.network(images, rois))

    def scores(self, logits: torch.Tensor, head: str) -> torch.Tensor:
        """Per-action scores K x 10: softmax probabilities (softmax head) or sigmoids (binary)."""
        if head == "softmax":
            return logits.float().softmax(dim=1)[:, : len(ACTION_CLASSES)]
        return torch.sigmoid(logits.float())


def training_regions(boxes: torch.Tensor, targets: torch.Tensor, height: int, width: int, config: ActionConfig,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One training image's regions and their action targets: with ``regions: box`` its person
    boxes; with ``jitter`` (the default), up to ``rois_per_batch / images_per_batch`` regions drawn
    without replacement from its person boxes and boxes around them that overlap a person box by
    IoU >= ``region_iou`` (each takes the actions of the person it overlaps most), a stand-in for
    the Selective Search regions R*CNN samples the same way (lib/data_layer/minibatch.py
    ``_sample_rois`` with ``FG_FRACTION: 1``, ``FG_THRESH: 0.5``). Around a person of size w x h a
    candidate's centre moves by up to a quarter of w and h and its sides scale by 0.7..1.4 (in
    log space); the candidate is clipped to the image. ``boxes``: P x 4 pixel indices;
    ``targets``: P x 10."""
    if config.regions == "box" or len(boxes) == 0:
        return boxes, targets
    count = len(boxes) * JITTER_DRAWS
    person = boxes.repeat_interleave(JITTER_DRAWS, dim=0)
    widths, heights = person[:, 2] - person[:, 0] + 1, person[:, 3] - person[:, 1] + 1
    shift = (torch.rand(count, 2, generator=generator) - 0.5) * 0.5
    scale = torch.exp(torch.empty(count, 2).uniform_(math.log(0.7), math.log(1.4), generator=generator))
    cx, cy = person[:, 0] + 0.5 * widths + shift[:, 0] * widths, person[:, 1] + 0.5 * heights + shift[:, 1] * heights
    w, h = widths * scale[:, 0], heights * scale[:, 1]
    candidates = torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - 1, cy + 0.5 * h - 1), dim=1).round()
    candidates[:, 0::2] = candidates[:, 0::2].clamp(0, width - 1)
    candidates[:, 1::2] = candidates[:, 1::2].clamp(0, height - 1)
    regions = torch.cat((boxes, candidates))
    best_iou, owner = box_iou(regions, boxes).max(dim=1)
    kept = torch.nonzero(best_iou >= config.region_iou).flatten()
    kept = kept[torch.randperm(len(kept), generator=generator)[: config.rois_per_batch // config.images_per_batch]]
    return regions[kept], targets[owner[kept]]


def _train(model: PrimaryRegion, train: VocSplit, usable: list[int], config: ActionConfig, plan: Schedule, seed: int,
           device: torch.device, workers: int, log, curve: Curve) -> None:
    generator = child_generator(seed, 2)  # region sampling (0: the new layer, 1: the image order)
    conv_ids = {id(p) for conv in model.network.convs for p in conv.parameters()}
    optimizer = caffe_sgd(model, conv_ids, {id(p) for p in model.classifier.parameters()}, config)
    per_batch = min(config.images_per_batch, len(usable))
    order = training_plan(usable, plan, config.images_per_batch, config.flip_probability, child_generator(seed, 1))
    progress = Progress("action: train", plan.iterations, unit="it", log=log)
    window = []
    model.train()
    with ImageStream(train, config.image_size, config.max_size, workers, ahead=max(4, 2 * workers)) as stream:
        images = stream.images(order)
        for iteration in range(plan.iterations):
            batch = [next(images) for _ in range(per_batch)]
            lr = plan.lr(config.lr, iteration)
            set_lr(optimizer, lr)
            rois, targets = [], []
            for position, image in enumerate(batch):
                source = train.images[image.index]
                boxes = _boxes(source)
                if image.flipped:
                    boxes = flip_boxes(boxes, source.width)
                boxes, box_targets = training_regions(boxes, action_targets(source), source.height, source.width,
                                                      config, generator)
                rois.append(torch.cat((torch.full((len(boxes), 1), float(position)), boxes * image.scale), dim=1))
                targets.append(box_targets)
            logits = model(image_batch([image.pixels for image in batch], device), torch.cat(rois).to(device))
            target = torch.cat(targets).to(device)
            if config.head == "softmax":
                loss = F.cross_entropy(logits, softmax_labels(target))
            else:
                loss = F.binary_cross_entropy_with_logits(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            window.append(loss.item())
            if (iteration + 1) % DISPLAY_EVERY == 0 or iteration + 1 == plan.iterations:
                curve({"action/loss": float(np.mean(window)), "action/lr": lr}, iteration + 1)
                window = []
            progress.update()
    progress.close()


@torch.no_grad()
def _test(model: PrimaryRegion, test: VocSplit, scored: list[int], config: ActionConfig, device: torch.device,
          workers: int, log) -> torch.Tensor:
    """Scores (persons x 10) of the persons of the ``scored`` images, image by image."""
    model.eval()
    found = []
    progress = Progress("action: test", len(scored), unit="images", log=log)
    with ImageStream(test, config.image_size, config.max_size, workers, ahead=max(4, 2 * workers)) as stream:
        for image in stream.images((index, False) for index in scored):
            boxes = _boxes(test.images[image.index])
            rois = torch.cat((torch.zeros(len(boxes), 1), boxes * image.scale), dim=1)
            logits = model(image_batch([image.pixels], device), rois.to(device))
            found.append(model.scores(logits, config.head).cpu())
            progress.update()
    progress.close()
    return torch.cat(found)


def person_crops(images: list[VocImage], encoded, size: int, context: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``model: crops``: each person as a ``size`` x ``size`` crop (box enlarged by ``context``) and
    a multi-hot matrix of its actions; ``encoded(i)`` gives image i's stored bytes."""
    crops, targets = [], []
    for index, image in enumerate(images):
        if not persons(image):
            continue
        pixels = decode_rgb(encoded(index), image.image_id)
        height, width = pixels.shape[-2:]
        for person in persons(image):
            xmin, ymin, xmax, ymax = person.box
            cx, cy = (xmin + xmax) / 2 - 1, (ymin + ymax) / 2 - 1
            half_w, half_h = context * (xmax - xmin + 1) / 2, context * (ymax - ymin + 1) / 2
            x0, x1 = max(0, int(cx - half_w)), min(width, int(cx + half_w) + 1)
            y0, y1 = max(0, int(cy - half_h)), min(height, int(cy + half_h) + 1)
            crops.append(resize_uint8(pixels[:, y0:y1, x0:x1], size, size))
        targets.append(action_targets(image))
    if not crops:
        raise UserError("the VOC 2012 action split holds no annotated persons")
    return torch.stack(crops), torch.cat(targets)


def _crops_scores(backbone: AlexNet, data: VocSplits, config: ActionConfig, device: torch.device, seed: int,
                  log, curve: Curve) -> torch.Tensor:
    size = short_side_for(backbone.resolution)
    train_x, train_y = person_crops(list(data.train.images), data.train.encoded, size, config.crops.context)
    test_x, _ = person_crops(list(data.test.images), data.test.encoded, size, config.crops.context)
    model = finetune(backbone, train_x, train_y, len(ACTION_CLASSES), config.crops, device, seed,
                     multi_label=True, log=log, task="action", curve=curve)
    return torch.sigmoid(predict(model, test_x, device))


def score_actions(test: VocSplit, scored: list[int], scores: torch.Tensor) -> tuple[dict[str, float], pa.Table]:
    """AP per action over the persons of the ``scored`` images (VOC 2012 area AP; NaN for an action
    no person does) and the ``voc12_act_scores`` table, rows by image, person, action."""
    image_ids, numbers, targets = [], [], []
    for index in scored:
        image = test.images[index]
        image_ids += [image.image_id] * len(persons(image))
        numbers += list(range(len(persons(image))))
        targets.append(action_targets(image))
    labels = torch.cat(targets).to(torch.int64).numpy()
    values = scores.double().numpy()
    aps = {action: metrics.average_precision(values[:, column], labels[:, column], eleven_point=False)
           for column, action in enumerate(ACTION_CLASSES)}
    actions = len(ACTION_CLASSES)
    table = pa.table({
        "image_id": pa.array(np.repeat(image_ids, actions).tolist(), pa.string()),
        "person": pa.array(np.repeat(numbers, actions), pa.int64()),
        "action": pa.array(list(ACTION_CLASSES) * len(image_ids), pa.string()),
        "score": pa.array(values.reshape(-1), pa.float64()),
        "label": pa.array(labels.reshape(-1), pa.int64()),
    })
    return aps, table


def evaluate_action(backbone: AlexNet, data: VocSplits, config: ActionConfig, device: torch.device, seed: int,
                    log=print, curve: Curve = no_curve, *, runtime: ActionRuntime = ActionRuntime()) -> StageOutput:
    """PASCAL-ACT-CLS: train on the persons of ``data.train`` (VOC 2012 action train), score the
    persons of ``data.test`` (val); see the module docstring.

    Returns ``StageOutput``: ``voc12_act_map`` (mean over the actions that have a val person of
    VOC 2012's AP) and ``voc12_act_ap/<action>`` in percent, and the per-image table
    ``voc12_act_scores``. ``curve`` receives ``action/loss`` and ``action/lr`` every 20
    iterations (step = iterations done; ``model: crops`` logs epochs instead). ``runtime``: how
    fast, not what (``ActionRuntime``); ``config`` is taken as checked (``config.from_dict``). The caller's
    backbone is not changed; every random draw comes from ``seed`` (dropout from torch's global
    generator, seeded here and restored afterwards). Raises UserError when a split holds no
    person box."""
    started = time.perf_counter()
    train_images = [index for index, image in enumerate(data.train.images) if persons(image)]
    scored = [index for index, image in enumerate(data.test.images) if persons(image)]
    for split, kept in ((data.train, train_images), (data.test, scored)):
        if not kept:
            raise UserError(f"the {split.name} split holds no annotated persons")
        if len(kept) < len(split):
            log(f"action: {len(split) - len(kept)} of {len(split)} {split.name} images have no person box: left out")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # dropout (and the crops model's new fc8) draw from the global generator
        if config.model == "crops":
            scores = _crops_scores(backbone, data, config, device, seed, log, curve)
        else:
            workers = runtime.workers or default_workers(device)
            plan = schedule(config, len(train_images))
            log(f"action: {sum(len(persons(data.train.images[i])) for i in train_images)} persons in "
                f"{len(train_images)} images, {plan.iterations} iterations (lr / 10 at {plan.lr_step})")
            network = RegionNetwork(backbone, config.roi_pool)
            network.freeze_convs(config.frozen_convs)
            outputs = len(ACTION_CLASSES) + (1 if config.head == "softmax" else 0)
            model = PrimaryRegion(network, outputs, child_generator(seed, 0)).to(device)
            _train(model, data.train, train_images, config, plan, seed, device, workers, log, curve)
            scores = _test(model, data.test, scored, config, device, workers, log)
    aps, table = score_actions(data.test, scored, scores)
    result = {f"{metrics.ACTION_AP}/{action}": 100 * ap for action, ap in aps.items() if ap == ap}
    result["voc12_act_map"] = 100 * metrics.mean_ap(aps.values())  # actions without val positives skipped
    log(f"action: mAP {result['voc12_act_map']:.1f} over {len(result) - 1} actions "
        f"({time.perf_counter() - started:.1f}s)")
    return StageOutput(result, {"voc12_act_scores": table})
