"""PASCAL-DET: VOC 2007 object detection, Fast R-CNN on the pretrained AlexNet.

The study fine-tuned each pretrained network as a Fast R-CNN detector (Girshick, "Fast R-CNN",
ICCV 2015) on VOC 2007 trainval and reported the mean over the 20 classes of the VOC 2007 11-point
AP on test. ``evaluate_detection`` does this with Fast R-CNN's CaffeNet recipe, the defaults of
``DetectionConfig``:

=========================  =====================  =================================================
setting                    default                source
=========================  =====================  =================================================
proposals                  Selective Search       paper sec. 4 (fast mode, ~2k per image), stored by
                                                  ``itl-ray prepare voc2007`` (``VocSplit.proposals``)
image_size, max_size       600, 1000 px           fast-rcnn lib/fast_rcnn/config.py ``TRAIN.SCALES``
                                                  (line 38), ``TRAIN.MAX_SIZE`` (41), ``TEST.SCALES``
                                                  (89), ``TEST.MAX_SIZE`` (92); lib/utils/blob.py
                                                  ``prep_im_for_blob``
iterations                 40,000                 tools/train_net.py ``--iters`` default 40000;
                                                  lib/fast_rcnn/train.py ``train_net(max_iters=40000)``
lr, lr_step                0.001, / 10 at 30,000  models/CaffeNet/solver.prototxt ``base_lr: 0.001``,
                                                  ``lr_policy: "step"``, ``gamma: 0.1``,
                                                  ``stepsize: 30000``; paper sec. 2.3 "30k mini-batch
                                                  iterations, then ... 0.0001 ... another 10k"
momentum, weight_decay     0.9, 0.0005            solver.prototxt ``momentum``, ``weight_decay``
bias_lr_multiplier         2                      models/CaffeNet/train.prototxt: every trained
bias_decay_multiplier      0                      layer's bias ``param { lr_mult: 2 decay_mult: 0 }``;
                                                  paper sec. 2.3 "1 for weights and 2 for biases"
frozen_convs               1 (conv1)              train.prototxt conv1 ``lr_mult: 0 decay_mult: 0``;
                                                  paper sec. 4.5 (conv1 is not fine-tuned for S, M)
images_per_batch           2                      config.py ``TRAIN.IMS_PER_BATCH`` (line 44)
rois_per_batch             128 (64 per image)     config.py ``TRAIN.BATCH_SIZE`` (47); minibatch.py
fg_fraction, fg_iou        0.25, 0.5              config.py ``TRAIN.FG_FRACTION`` (50),
                                                  ``TRAIN.FG_THRESH`` (53)
bg_iou_low, bg_iou_high    0.1, 0.5               config.py ``TRAIN.BG_THRESH_LO`` (58), ``_HI`` (57)
flip_probability           0.5                    config.py ``TRAIN.USE_FLIPPED`` (61); paper sec.
                                                  2.3 "horizontally flipped with probability 0.5"
train_difficult            True                   lib/datasets/pascal_voc.py
                                                  ``_load_pascal_annotation`` keeps every object
box_regression_iou         0.5                    config.py ``TRAIN.BBOX_THRESH`` (68)
box_normalisation          per_class              lib/roi_data_layer/roidb.py
                                                  ``add_bbox_regression_targets``: per-class mean and
                                                  std over the training regions (flipped included);
                                                  paper sec. 2.3 "zero mean and unit variance"
roi_pool                   max, pool5's grid      train.prototxt ``roi_pool5``: ``ROIPooling``,
                                                  ``pooled_w/h: 6``, ``spatial_scale: 0.0625``
(new layers)               N(0, 0.01), N(0, .001)  train.prototxt ``cls_score`` / ``bbox_pred``
                                                  ``weight_filler``, bias 0; on fc7 (see below)
(loss)                     softmax + smooth L1    train.prototxt ``SoftmaxWithLoss``,
                                                  ``SmoothL1Loss`` (``loss_weight: 1``); paper eq. 1-3
nms_iou                    0.3                    config.py ``TEST.NMS`` (96)
score_threshold            0.05                   py-faster-rcnn lib/fast_rcnn/test.py ``test_net(net,
max_detections             100 per image          imdb, max_per_image=100, thresh=0.05)`` (the same in
                                                  fast-rcnn's later test.py); see below
(metric)                   VOC07 11-point AP      devkit VOCevaldet, ``itl_ray.metrics``
=========================  =====================  =================================================

Score thresholding at test: two released test codes differ. The first fast-rcnn release keeps,
per class, the best 40 x (test images) detections over the whole test set and thresholds later;
py-faster-rcnn (and fast-rcnn's later test.py) keeps, per image and class, the detections scoring
above 0.05, applies NMS, then the best 100 per image over all classes. This module does the
latter: it works image by image, so the test pass streams and its memory does not grow with the
test set.

Steps:
1. Every training image's regions are its ground-truth boxes and its proposals (Fast R-CNN's
   roidb: ground truth first); each region takes the label of the box it overlaps most. One pass
   over the training images (annotations and proposals only, no pixels) computes the box
   regression targets' per-class mean and standard deviation and finds the images with no usable
   region (no foreground and no background region: an image without objects), which Fast R-CNN
   leaves out of training (lib/fast_rcnn/train.py ``filter_roidb``); they are counted in the log.
2. Training: ``iterations`` SGD steps, each on ``images_per_batch`` images (read from the shards
   by worker threads, ``image_stream``; flipped at random), each giving ``rois_per_batch /
   images_per_batch`` sampled regions; loss = softmax cross-entropy over the regions + smooth L1
   (beta 1) on the foreground regions' normalised targets for their own class, divided by the
   number of regions.
3. Test, one image at a time (as Fast R-CNN's ``im_detect``; ``runtime.detection.test_batch_size``
   puts several in one forward pass): every proposal is scored (softmax)
   and regressed per class (boxes clipped to the image), then per class thresholded and
   suppressed (NMS), then the image's best ``max_detections``; boxes go back to the stored
   image's VOC coordinates and ``itl_ray.metrics`` matches them to the ground truth (difficult
   objects ignored) and scores each class.

Settings beside the recipe (each defaults to the recipe's choice): ``proposals: sliding_window``
(dense windows, for images too small for Selective Search), ``roi_pool: align``, ``epochs`` (count
training in passes over trainval), ``conv_lr_scale`` and ``head_lr_scale`` (multipliers of the
convolutions' and the new layers' rates, 1 in the recipe), ``box_normalisation: fixed``
(py-faster-rcnn's ``BBOX_NORMALIZE_STDS`` 0.1, 0.1, 0.2, 0.2, means 0), ``train_difficult: false``
(py-faster-rcnn's ``use_diff: False``). What the mini-benchmark sets differently is in
sweeps/smoke.yaml, with the reason beside each value.

Outputs: ``voc07_det_map`` and ``voc07_det_ap/<class>`` in percent (a class without a non-difficult
test object has no AP: it is named in the log, left out of the mean and its key omitted, not NaN,
which tracking backends and tables handle badly), and the per-image tables
``voc07_det_detections`` and ``voc07_det_positives`` (CONTRACTS: one row per kept detection with
its tp/fp flags, one row per test image and class with its positives).

Dropout: CaffeNet has two dropout layers, after fc6 and after fc7 (``drop6``, ``drop7``); the
backbone's fc6/fc7 block (``models.AlexNet.embed``) brings its own two, at the places it was
pretrained with them, and the new layers sit directly on its fc7.

Boxes: the annotations and proposals are in the stored image's pixels (VOC coordinates are
1-based; inside this module boxes are 0-based pixel indices, corners inclusive, as in Fast
R-CNN); a region's box on the network's input is its box times the image's scale.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from itl_ray.bounds import Ge, Gt, Interval, MinLen
from torch import nn
from torchvision.ops import batched_nms

from itl_ray.datasets.voc import VOC_CLASSES, VocImage, VocSplit, VocSplits
from itl_ray.errors import UserError
from itl_ray.metrics import DETECTION_AP, box_iou, match_detections, mean_ap, ranked_detection_ap
from itl_ray.models import AlexNet
from itl_ray.progress import Progress
from itl_ray.transfer import Curve, StageOutput, no_curve
from itl_ray.transfer.image_stream import ImageStream, default_workers
from itl_ray.transfer.regions import (RegionNetwork, RegionRecipe, Schedule, caffe_sgd, child_generator, flip_boxes,
                                      image_batch, schedule, set_lr, training_plan)

# Iterations between two points of the training curves (solver.prototxt ``display: 20``).
DISPLAY_EVERY = 20
# The largest log size ratio applied at test (Detectron's value): keeps exp() finite.
MAX_LOG_RATIO = math.log(1000 / 16)

Fraction = Annotated[float, Interval(ge=0, le=1)]  # a probability, an IoU or a share, 0..1
Positive = Annotated[float, Gt(0)]


@dataclass(frozen=True)
class DetectionConfig(RegionRecipe):
    """Fast R-CNN's CaffeNet recipe on VOC 2007 (sources: the module docstring's table), plus the
    settings that replace parts of it. Inherits the schedule, SGD and image settings of
    ``RegionRecipe`` with Fast R-CNN's values as defaults."""

    proposals: Literal["selective_search", "sliding_window"] = "selective_search"
    rois_per_batch: Annotated[int, Ge(1)] = 128  # sampled regions per SGD step, split evenly over its images
    fg_fraction: Fraction = 0.25  # largest share of foreground regions
    fg_iou: Fraction = 0.5  # a region is foreground from this IoU with a ground-truth box
    bg_iou_low: Fraction = 0.1  # background regions have a best IoU in [bg_iou_low, bg_iou_high)
    bg_iou_high: Fraction = 0.5
    train_difficult: bool = True  # train on objects marked difficult too
    box_regression_iou: Fraction = 0.5  # regions at this IoU or more give the target statistics
    box_normalisation: Literal["per_class", "fixed"] = "per_class"  # per_class (empirical) or fixed (box_target_stds, means 0)
    box_target_stds: tuple[Positive, Positive, Positive, Positive] = (0.1, 0.1, 0.2, 0.2)  # for fixed
    score_threshold: Fraction = 0.05  # test: a class's detection is kept above this softmax score
    nms_iou: Fraction = 0.3  # test: non-maximum suppression IoU per class
    max_detections: Annotated[int, Ge(1)] = 100  # test: at most this many per image over all classes
    # Sliding-window proposals (proposals: sliding_window): window sides as fractions of the stored
    # image's shorter side, consecutive sizes ~1.5x apart; aspect ratios (width / height); the step
    # between windows as a fraction of the window's extent. At these values about 99% of objects
    # between a quarter and most of the shorter side have a window at IoU >= 0.5 (~330 windows on a
    # 128 x 170 image); objects smaller than the smallest window have none.
    window_sizes: Annotated[tuple[Annotated[float, Interval(gt=0, le=1)], ...], MinLen(1)] = (0.25, 0.4, 0.6, 0.85)
    window_ratios: Annotated[tuple[Annotated[float, Gt(0)], ...], MinLen(1)] = (0.5, 1.0, 2.0)
    window_stride: Annotated[float, Gt(0)] = 0.5

    def check(self) -> None:
        """The rules between fields (``RegionRecipe.check`` and two of detection's; bounds and
        choices are declared on the fields): ValueError naming the fields."""
        super().check()
        if self.rois_per_batch % self.images_per_batch:
            raise ValueError(f"rois_per_batch ({self.rois_per_batch}) must be a multiple of images_per_batch "
                             f"({self.images_per_batch}): each image gives the same number of regions")
        if not self.bg_iou_low < self.bg_iou_high:
            raise ValueError(f"bg_iou_low ({self.bg_iou_low:g}) must be below bg_iou_high ({self.bg_iou_high:g})")

    @property
    def rois_per_image(self) -> int:
        """Sampled regions per training image (Fast R-CNN: 128 / 2 = 64)."""
        return self.rois_per_batch // self.images_per_batch


@dataclass(frozen=True)
class DetectionRuntime:
    """How fast detection runs, not what it computes (the trial config's ``runtime.detection``; not
    part of ``trial_id``)."""

    # Image decoding threads (``image_stream.ImageStream``); 0: ``image_stream.default_workers``
    # (a GPU: all cores but two; a CPU: one). Images arrive in the same order with any number.
    workers: Annotated[int, Ge(0)] = 0
    # Test images per forward pass (no gradients; larger uses more memory). 1 (the default) scores
    # each image alone, as Fast R-CNN's test.py ``im_detect`` does. More images share a batch
    # padded at the bottom and right to its largest image with 0 after normalisation (as
    # ``im_list_to_blob`` pads), so conv5 cells near a smaller image's right and bottom edges see
    # the padding: regions there can score slightly differently. On a GPU one image already brings
    # ~2,000 RoIs per pass, so larger batches gain little.
    test_batch_size: Annotated[int, Ge(1)] = 1


# ----------------------------------------------------------------------------------------------
# Boxes


def _centres_and_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    widths = boxes[..., 2] - boxes[..., 0] + 1
    heights = boxes[..., 3] - boxes[..., 1] + 1
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode_boxes(proposals: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Regression targets (N x 4) that move each proposal onto its target box (R-CNN's
    parametrisation: centre shift in units of the proposal's size, log of the size ratio; sizes
    in pixels, x2 - x1 + 1, as py-faster-rcnn's bbox_transform)."""
    px, py, pw, ph = _centres_and_sizes(proposals)
    tx, ty, tw, th = _centres_and_sizes(targets)
    return torch.stack(((tx - px) / pw, (ty - py) / ph, torch.log(tw / pw), torch.log(th / ph)), dim=-1)


def decode_boxes(proposals: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Inverse of ``encode_boxes``: the boxes that ``deltas`` (N x 4, or N x C x 4 for C classes)
    make of the proposals (N x 4); the size ratio is capped at exp(``MAX_LOG_RATIO``)."""
    if deltas.ndim == 3:
        proposals = proposals[:, None, :]
    px, py, pw, ph = _centres_and_sizes(proposals)
    cx = px + deltas[..., 0] * pw
    cy = py + deltas[..., 1] * ph
    w = pw * torch.exp(deltas[..., 2].clamp(max=MAX_LOG_RATIO))
    h = ph * torch.exp(deltas[..., 3].clamp(max=MAX_LOG_RATIO))
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - 1, cy + 0.5 * h - 1), dim=-1)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes (... x 4) clipped to the image (pixel indices 0..width-1, 0..height-1)."""
    x = boxes[..., 0::2].clamp(0, width - 1)
    y = boxes[..., 1::2].clamp(0, height - 1)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def _window_starts(extent: int, window: float, step: float) -> torch.Tensor:
    """Start positions of windows along one axis, evenly spaced from 0 to the last position
    that fits, no further apart than ``step``, so the first and last windows touch the edges."""
    room = extent - window
    count = math.ceil(room / step - 1e-9) + 1 if room > 0 else 1
    return torch.linspace(0, max(room, 0.0), count, dtype=torch.float64)


@functools.lru_cache(maxsize=256)
def _windows(height: int, width: int, sizes: tuple, ratios: tuple, stride: float) -> torch.Tensor:
    shorter = min(height, width)
    windows = []
    for size in sizes:
        side = size * shorter
        for ratio in ratios:
            window_width = min(side * math.sqrt(ratio), width)
            window_height = min(side / math.sqrt(ratio), height)
            xs = _window_starts(width, window_width, stride * window_width)
            ys = _window_starts(height, window_height, stride * window_height)
            y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
            x0, y0 = x0.reshape(-1), y0.reshape(-1)
            windows.append(torch.stack((x0, y0, x0 + window_width - 1, y0 + window_height - 1), dim=1))
    boxes = torch.cat(windows).round()  # whole pixels, so cut-off duplicates compare equal
    return torch.unique(boxes, dim=0).to(torch.float32)


def sliding_window_proposals(height: int, width: int, config: DetectionConfig) -> torch.Tensor:
    """Proposals for an image of this size (px): every window of ``config.window_sizes``
    (fractions of the shorter side) and ``config.window_ratios`` (width / height, same area as the
    square), slid over the image with a step of ``config.window_stride`` times the window's extent.
    Windows larger than the image are cut to it; duplicates are removed. N x 4 float32,
    pixel-index coordinates, in a fixed order."""
    return _windows(height, width, tuple(config.window_sizes), tuple(config.window_ratios), config.window_stride)


def proposals_of(split: VocSplit, index: int, config: DetectionConfig) -> torch.Tensor:
    """The proposals of image ``index`` of ``split`` (K x 4 float32, stored-image pixel indices):
    its Selective Search boxes as prepared, or sliding windows over its stored size."""
    if config.proposals == "sliding_window":
        image = split.images[index]
        return sliding_window_proposals(image.height, image.width, config)
    boxes = torch.from_numpy(np.array(split.proposals(index), dtype=np.float32).reshape(-1, 4))
    return boxes


def ground_truth(image: VocImage, train_difficult: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """An image's objects of the VOC classes as boxes (G x 4 float32, 0-based pixel indices of the
    stored image) and class labels (G int64, 1..20; 0 is background), difficult ones included
    unless ``train_difficult`` is False."""
    objects = [obj for obj in image.objects if obj.name in VOC_CLASSES and (train_difficult or not obj.difficult)]
    boxes = torch.tensor([[value - 1 for value in obj.box] for obj in objects], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor([VOC_CLASSES.index(obj.name) + 1 for obj in objects], dtype=torch.int64)
    return boxes, labels


@dataclass(frozen=True)
class Regions:
    """An image's training regions (Fast R-CNN's roidb entry): its ground-truth boxes then its
    proposals, each with its best IoU with a ground-truth box, that box's label and the box."""

    boxes: torch.Tensor  # R x 4
    best_iou: torch.Tensor  # R
    labels: torch.Tensor  # R, int64, 0 when the image has no ground truth
    targets: torch.Tensor  # R x 4, the best-overlapping ground-truth box (the region itself without one)


def image_regions(proposals: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor) -> Regions:
    """The regions of one image (see ``Regions``)."""
    boxes = torch.cat((gt_boxes, proposals)) if len(gt_boxes) else proposals
    if len(gt_boxes) == 0:
        return Regions(boxes, torch.zeros(len(boxes)), torch.zeros(len(boxes), dtype=torch.int64), boxes)
    best_iou, best_gt = box_iou(boxes, gt_boxes).max(dim=1)
    return Regions(boxes, best_iou, gt_labels[best_gt], gt_boxes[best_gt])


def sample_rois(
    proposals: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    config: DetectionConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fast R-CNN's region sampling for one training image (lib/roi_data_layer/minibatch.py
    ``_sample_rois``): up to round(``fg_fraction`` x ``rois_per_image``) regions drawn without
    replacement from the foreground (IoU >= ``fg_iou``, ground-truth boxes included), the rest of
    the ``rois_per_image`` from the background (IoU in [``bg_iou_low``, ``bg_iou_high``), label 0),
    fewer when there are not enough. Returns regions R x 4, labels R, and the ground-truth box each
    region regresses to, R x 4 (meaningless for background)."""
    regions = image_regions(proposals, gt_boxes, gt_labels)
    foreground = torch.nonzero(regions.best_iou >= config.fg_iou).flatten()
    background = torch.nonzero((regions.best_iou >= config.bg_iou_low)
                               & (regions.best_iou < config.bg_iou_high)).flatten()
    fg_count = min(round(config.fg_fraction * config.rois_per_image), len(foreground))
    bg_count = min(config.rois_per_image - fg_count, len(background))
    foreground = foreground[torch.randperm(len(foreground), generator=generator)[:fg_count]]
    background = background[torch.randperm(len(background), generator=generator)[:bg_count]]
    keep = torch.cat((foreground, background))
    labels = regions.labels[keep].clone()
    labels[fg_count:] = 0
    return regions.boxes[keep], labels, regions.targets[keep]


@dataclass(frozen=True)
class BoxTargets:
    """Per-class normalisation of the box regression targets: (C + 1) x 4 means and stds (row 0,
    background, unused); a target is stored as (delta - mean) / std and predicted deltas are
    mapped back with delta * std + mean (Fast R-CNN un-normalises the trained bbox_pred layer the
    same way in lib/fast_rcnn/train.py ``snapshot``)."""

    means: torch.Tensor
    stds: torch.Tensor

    def normalise(self, deltas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (deltas - self.means[labels]) / self.stds[labels]

    def denormalise(self, deltas: torch.Tensor) -> torch.Tensor:
        """Predicted deltas K x C x 4 (classes 1..C) in pixels' units."""
        return deltas * self.stds[1:].to(deltas) + self.means[1:].to(deltas)


@dataclass(frozen=True)
class TrainingRegions:
    """What one pass over the training annotations and proposals finds (step 1 of the module
    docstring)."""

    usable: list[int]  # images with at least one foreground or background region
    without_objects: int  # images with no object to train on
    box_targets: BoxTargets


def training_regions(train: VocSplit, config: DetectionConfig) -> TrainingRegions:
    """The usable training images and the box targets' normalisation (Fast R-CNN: the regions at
    IoU >= ``box_regression_iou``, ground truth included, of every training image and, with
    flips, of its mirror image, whose dx is the negative; a class with no region, or targets
    that do not vary, keeps mean 0 and std 1)."""
    classes = len(VOC_CLASSES) + 1
    counts = torch.zeros(classes, dtype=torch.float64)
    sums = torch.zeros(classes, 4, dtype=torch.float64)
    squares = torch.zeros(classes, 4, dtype=torch.float64)
    usable, without_objects = [], 0
    for index, image in enumerate(train.images):
        gt_boxes, gt_labels = ground_truth(image, config.train_difficult)
        if len(gt_boxes) == 0:
            without_objects += 1
        regions = image_regions(proposals_of(train, index, config), gt_boxes, gt_labels)
        foreground = regions.best_iou >= config.fg_iou
        background = (regions.best_iou >= config.bg_iou_low) & (regions.best_iou < config.bg_iou_high)
        if len(gt_boxes) and (foreground.any() or background.any()):
            usable.append(index)
        chosen = regions.best_iou >= config.box_regression_iou
        if len(gt_boxes) == 0 or not chosen.any():
            continue
        deltas = encode_boxes(regions.boxes[chosen], regions.targets[chosen]).double()
        labels = regions.labels[chosen]
        if config.flip_probability > 0:
            deltas = torch.cat((deltas, deltas * deltas.new_tensor([-1.0, 1.0, 1.0, 1.0])))
            labels = torch.cat((labels, labels))
        counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
        sums.index_add_(0, labels, deltas)
        squares.index_add_(0, labels, deltas**2)
    if config.box_normalisation == "fixed":
        means = torch.zeros(classes, 4)
        stds = torch.tensor(config.box_target_stds, dtype=torch.float32).expand(classes, 4).clone()
    else:
        seen = counts > 0
        means = torch.zeros(classes, 4, dtype=torch.float64)
        means[seen] = sums[seen] / counts[seen, None]
        variances = torch.zeros(classes, 4, dtype=torch.float64)
        variances[seen] = (squares[seen] / counts[seen, None] - means[seen] ** 2).clamp(min=0)
        stds = variances.sqrt()
        stds[stds <= 1e-12] = 1.0
        means, stds = means.float(), stds.float()
    return TrainingRegions(usable, without_objects, BoxTargets(means, stds))


# ----------------------------------------------------------------------------------------------
# The detector


class FastRCNN(nn.Module):
    """The region network (conv1..conv5, RoI pooling to pool5's grid, fc6, fc7) -> a (classes + 1)-way
    classifier (background is class 0) and class-specific box regression.
    ``forward(images, rois)``: class logits K x (C + 1), box deltas K x C x 4 (normalised)."""

    def __init__(self, network: RegionNetwork, num_classes: int, generator: torch.Generator):
        super().__init__()
        self.network = network
        self.num_classes = num_classes
        self.classifier = nn.Linear(network.embed_dim, num_classes + 1)
        self.box_regressor = nn.Linear(network.embed_dim, 4 * num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01, generator=generator)
        nn.init.normal_(self.box_regressor.weight, std=0.001, generator=generator)
        nn.init.zeros_(self.classifier.bias)
        nn.init.zeros_(self.box_regressor.bias)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fc7 = self.network(images, rois)
        return self.classifier(fc7), self.box_regressor(fc7).view(-1, self.num_classes, 4)


def detection_loss(logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax cross-entropy averaged over the regions, and smooth L1 (beta 1) between the
    foreground regions' deltas for their own class and their normalised targets, summed over the
    four numbers and divided by the number of regions (Fast R-CNN's SmoothL1Loss layer)."""
    classification = F.cross_entropy(logits, labels)
    foreground = torch.nonzero(labels > 0).flatten()
    own_class = deltas[foreground, labels[foreground] - 1]
    regression = F.smooth_l1_loss(own_class, targets[foreground], beta=1.0, reduction="sum") / len(labels)
    return classification, regression


def _train(model: FastRCNN, train: VocSplit, regions: TrainingRegions, config: DetectionConfig, plan: Schedule,
           seed: int, device: torch.device, workers: int, log, curve: Curve) -> None:
    generator = child_generator(seed, 2)  # region sampling (0: the new layers, 1: the image order)
    conv_ids = {id(p) for conv in model.network.convs for p in conv.parameters()}
    head_ids = {id(p) for layer in (model.classifier, model.box_regressor) for p in layer.parameters()}
    optimizer = caffe_sgd(model, conv_ids, head_ids, config)
    per_batch = min(config.images_per_batch, len(regions.usable))
    order = training_plan(regions.usable, plan, config.images_per_batch, config.flip_probability,
                          child_generator(seed, 1))
    progress = Progress("detection: train", plan.iterations, unit="it", log=log)
    window = []
    model.train()
    with ImageStream(train, config.image_size, config.max_size, workers, ahead=max(4, 2 * workers)) as stream:
        images = stream.images(order)
        for iteration in range(plan.iterations):
            batch = [next(images) for _ in range(per_batch)]
            lr = plan.lr(config.lr, iteration)
            set_lr(optimizer, lr)
            rois, labels, targets = [], [], []
            for position, image in enumerate(batch):
                source = train.images[image.index]
                gt_boxes, gt_labels = ground_truth(source, config.train_difficult)
                proposals = proposals_of(train, image.index, config)
                if image.flipped:
                    gt_boxes, proposals = flip_boxes(gt_boxes, source.width), flip_boxes(proposals, source.width)
                boxes, box_labels, box_targets = sample_rois(proposals, gt_boxes, gt_labels, config, generator)
                rois.append(torch.cat((torch.full((len(boxes), 1), float(position)), boxes * image.scale), dim=1))
                labels.append(box_labels)
                targets.append(regions.box_targets.normalise(encode_boxes(boxes, box_targets), box_labels))
            logits, deltas = model(image_batch([image.pixels for image in batch], device), torch.cat(rois).to(device))
            classification, regression = detection_loss(logits, deltas, torch.cat(labels).to(device),
                                                        torch.cat(targets).to(device))
            loss = classification + regression
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            window.append((classification.item(), regression.item()))
            if (iteration + 1) % DISPLAY_EVERY == 0 or iteration + 1 == plan.iterations:
                mean_classification, mean_regression = np.mean(window, axis=0)
                curve({"detection/loss": float(mean_classification + mean_regression),
                       "detection/loss_classification": float(mean_classification),
                       "detection/loss_box": float(mean_regression), "detection/lr": lr}, iteration + 1)
                window = []
            progress.update()
    progress.close()


# ----------------------------------------------------------------------------------------------
# Test


@dataclass(frozen=True)
class ImageDetections:
    """The detections kept in one test image: class labels (1..C), scores, boxes in the stored
    image's VOC coordinates (1-based), best first within each class."""

    labels: np.ndarray  # int64
    scores: np.ndarray  # float64
    boxes: np.ndarray  # float64, N x 4


def detect_in_image(scores: torch.Tensor, boxes: torch.Tensor, config: DetectionConfig) -> ImageDetections:
    """Per class: the boxes scoring above ``score_threshold``, non-maximum suppression at
    ``nms_iou``; then, when more than ``max_detections`` remain over all classes, those scoring at
    least the ``max_detections``-th best (py-faster-rcnn's ``test_net``). ``scores``: K x (C + 1)
    softmax scores; ``boxes``: K x C x 4 class-specific boxes, 0-based pixel indices."""
    candidates, classes = torch.nonzero(scores[:, 1:] > config.score_threshold, as_tuple=True)
    if len(candidates) == 0:
        return ImageDetections(np.zeros(0, np.int64), np.zeros(0), np.zeros((0, 4)))
    kept_scores = scores[candidates, classes + 1]
    kept_boxes = boxes[candidates, classes]
    # torchvision's nms measures a box as x2 - x1: add one pixel so areas follow VOC's convention.
    keep = batched_nms(kept_boxes + kept_boxes.new_tensor([0.0, 0.0, 1.0, 1.0]), kept_scores, classes,
                       config.nms_iou)
    labels, found_scores, found_boxes = classes[keep] + 1, kept_scores[keep], kept_boxes[keep]
    if len(found_scores) > config.max_detections:
        threshold = torch.sort(found_scores).values[-config.max_detections]
        chosen = found_scores >= threshold
        labels, found_scores, found_boxes = labels[chosen], found_scores[chosen], found_boxes[chosen]
    order = np.lexsort((-found_scores.double().numpy(), labels.numpy()))  # by class, best first
    return ImageDetections(labels.numpy()[order].astype(np.int64), found_scores.double().numpy()[order],
                           found_boxes.double().numpy()[order] + 1)


@torch.no_grad()
def _test(model: FastRCNN, test: VocSplit, box_targets: BoxTargets, config: DetectionConfig, device: torch.device,
          runtime: DetectionRuntime, workers: int, log) -> list[ImageDetections]:
    """Every test image's detections, in split order, ``runtime.test_batch_size`` images per
    forward pass."""
    model.eval()
    found = []
    progress = Progress("detection: test", len(test), unit="images", log=log)

    def detect(batch: list) -> None:
        proposals = [proposals_of(test, image.index, config) for image in batch]
        rois = torch.cat([torch.cat((torch.full((len(boxes), 1), float(position)), boxes * image.scale), dim=1)
                          for position, (image, boxes) in enumerate(zip(batch, proposals))])
        if len(rois):
            logits, deltas = model(image_batch([image.pixels for image in batch], device), rois.to(device))
            scores, deltas = logits.float().softmax(dim=1).cpu(), box_targets.denormalise(deltas.float().cpu())
        start = 0
        for image, boxes in zip(batch, proposals):
            end = start + len(boxes)
            if len(boxes) == 0:
                found.append(detect_in_image(torch.zeros(0, 1), torch.zeros(0, 0, 4), config))
            else:
                source = test.images[image.index]
                decoded = decode_boxes(boxes, deltas[start:end])
                found.append(detect_in_image(scores[start:end], clip_boxes(decoded, source.height, source.width),
                                             config))
            start = end
        progress.update(len(batch))

    with ImageStream(test, config.image_size, config.max_size, workers, ahead=max(4, 2 * workers)) as stream:
        batch = []
        for image in stream.images((index, False) for index in range(len(test))):
            batch.append(image)
            if len(batch) == runtime.test_batch_size:
                detect(batch)
                batch = []
        if batch:
            detect(batch)
    progress.close()
    return found


def score_detections(test: VocSplit, found: list[ImageDetections]) -> tuple[dict[str, float], dict[str, pa.Table],
                                                                             list[str]]:
    """Match each class's detections to the test ground truth (``metrics.match_detections``),
    score them, and build the per-image tables. Returns (AP per class with positives, as
    fractions; the tables ``voc07_det_detections`` and ``voc07_det_positives``; the classes
    without a non-difficult test object)."""
    image_ids = [image.image_id for image in test.images]
    aps, absent = {}, []
    columns = {"image_id": [], "class": [], "score": [], "tp": [], "fp": []}
    positives = {"image_id": [], "class": [], "positives": []}
    for label, name in enumerate(VOC_CLASSES, start=1):
        truth = {image.image_id: [(obj.box, obj.difficult) for obj in image.objects if obj.name == name]
                 for image in test.images}
        for image_id, objects in zip(image_ids, truth.values()):
            positives["image_id"].append(image_id)
            positives["class"].append(name)
            positives["positives"].append(sum(1 for _, difficult in objects if not difficult))
        detections = [(image_ids[index], float(score), tuple(box.tolist()))
                      for index, detected in enumerate(found)
                      for score, box in zip(detected.scores[detected.labels == label],
                                            detected.boxes[detected.labels == label])]
        tp, fp, count = match_detections(detections, truth)
        scores = np.array([score for _, score, _ in detections], dtype=np.float64)
        columns["image_id"] += [image_id for image_id, _, _ in detections]
        columns["class"] += [name] * len(detections)
        columns["score"] += scores.tolist()
        columns["tp"] += tp.tolist()
        columns["fp"] += fp.tolist()
        if count == 0:
            absent.append(name)
        else:
            aps[name] = ranked_detection_ap(scores, tp, fp, count, eleven_point=True)
    tables = {
        "voc07_det_detections": pa.table({"image_id": pa.array(columns["image_id"], pa.string()),
                                          "class": pa.array(columns["class"], pa.string()),
                                          "score": pa.array(columns["score"], pa.float64()),
                                          "tp": pa.array(columns["tp"], pa.bool_()),
                                          "fp": pa.array(columns["fp"], pa.bool_())}),
        "voc07_det_positives": pa.table({"image_id": pa.array(positives["image_id"], pa.string()),
                                         "class": pa.array(positives["class"], pa.string()),
                                         "positives": pa.array(positives["positives"], pa.int64())}),
    }
    return aps, tables, absent


# ----------------------------------------------------------------------------------------------
# The task


def evaluate_detection(
    backbone: AlexNet,
    data: VocSplits,
    config: DetectionConfig,
    device: torch.device,
    seed: int,
    log=print,
    curve: Curve = no_curve,
    *,
    runtime: DetectionRuntime = DetectionRuntime(),
) -> StageOutput:
    """Fine-tune a copy of ``backbone`` as a Fast R-CNN detector on ``data.train`` (VOC 2007
    trainval) and measure it on ``data.test`` (VOC 2007 test); see the module docstring.

    Returns ``StageOutput``: metrics in percent, ``voc07_det_map`` and ``voc07_det_ap/<class>`` for
    each class with a non-difficult test object; per-image tables ``voc07_det_detections`` and
    ``voc07_det_positives``. ``curve`` receives ``detection/loss`` (with its classification and
    box parts) and ``detection/lr`` every 20 iterations, step = iterations done. ``runtime``: how
    fast, not what (``DetectionRuntime``: decoding threads, test images per forward pass).
    ``config`` is taken as checked (``config.from_dict`` validates the trial's config).

    The caller's backbone is not modified. Every random draw comes from ``seed`` (the new layers,
    region sampling, image order and flips; dropout from torch's global generator, seeded here
    and restored afterwards), so a run on the CPU is repeated exactly. Raises UserError for an
    empty split, a training split with no usable image, or a test split with no object.
    """
    train, test = data.train, data.test
    if not len(train):
        raise UserError(f"the {train.name} split is empty: the detector has nothing to train on")
    if not len(test):
        raise UserError(f"the {test.name} split is empty: there is nothing to measure detection on")
    started = time.perf_counter()
    workers = runtime.workers or default_workers(device)
    regions = training_regions(train, config)
    if not regions.usable:
        raise UserError(f"no image of {train.name} has an object to train on")
    plan = schedule(config, len(regions.usable))
    log(f"detection: {len(regions.usable)} of {len(train)} {train.name} images to train on"
        + (f" ({regions.without_objects} without objects left out, as Fast R-CNN's filter_roidb does)"
           if regions.without_objects else "")
        + f", {plan.iterations} iterations (lr / 10 at {plan.lr_step}), {config.proposals} proposals")

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # dropout draws from the global generator
        network = RegionNetwork(backbone, config.roi_pool)
        network.freeze_convs(config.frozen_convs)
        model = FastRCNN(network, len(VOC_CLASSES), child_generator(seed, 0)).to(device)
        trained = time.perf_counter()
        _train(model, train, regions, config, plan, seed, device, workers, log, curve)
        trained = time.perf_counter() - trained
        found = _test(model, test, regions.box_targets, config, device, runtime, workers, log)

    aps, tables, absent = score_detections(test, found)
    if not aps:
        raise UserError(f"the {test.name} images have no non-difficult object of any class: mAP is undefined")
    if absent:
        log(f"detection: no non-difficult test objects of {', '.join(absent)}: left out of the mean, no AP reported")
    metrics = {f"{DETECTION_AP}/{name}": 100 * ap for name, ap in aps.items()}
    metrics["voc07_det_map"] = 100 * mean_ap(aps.values())
    log(f"detection: mAP {metrics['voc07_det_map']:.1f} over {len(aps)} classes; {plan.iterations} iterations in "
        f"{trained:.1f}s ({plan.iterations / max(trained, 1e-9):.2f} it/s), {time.perf_counter() - started:.1f}s "
        "in all")
    return StageOutput(metrics, tables)
