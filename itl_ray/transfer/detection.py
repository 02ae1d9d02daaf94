"""PASCAL-DET: VOC 2007 object detection, Fast R-CNN on the pretrained AlexNet.

The study fine-tuned each pretrained network as a Fast R-CNN detector (Girshick 2015) on VOC 2007
trainval and reported the mean AP over the 20 classes on test (VOC 2007 11-point AP). This
module does the same, in one function, ``evaluate_detection``:

1. Every image is decoded once and scaled so its shorter side is ``image_size`` (longer side at
   most ``max_size``), as Fast R-CNN does with 600/1000 px.
2. Region proposals. **Assumption**: the study used Selective Search proposals, which are not
   available here; proposals are dense sliding windows instead, at several sizes (fractions of
   the image's shorter side) and aspect ratios, on a stride proportional to the window size.
   They depend only on the image size. During training the ground-truth boxes are added to the
   proposals, as Fast R-CNN does.
3. Network. The whole pretrained AlexNet is fine-tuned (conv1..fc7, as in the study). A region
   is pooled from conv5 (stride 16) with RoI Align to 2g x 2g cells and max-pooled 2x2 to g x g,
   g being the pool5 grid the backbone was pretrained with, so the pretrained fc6 and fc7 apply
   unchanged (Fast R-CNN's RoI pooling replaces pool5 in the same way). On fc7 sit two new
   layers: a (classes + 1)-way classifier (background is class 0) and class-specific box
   regression (4 numbers per class).
4. Training, Fast R-CNN's recipe: minibatches of ``batch_size`` images with ``rois_per_image``
   sampled regions each, at most a quarter of them foreground (IoU >= 0.5 with a ground-truth
   box) and the rest background (IoU in [0.1, 0.5)); loss = softmax cross-entropy + smooth L1
   on the normalised box targets of the foreground regions; SGD with momentum and weight decay,
   the learning rate divided by 10 for the last part of training; random horizontal flips.
   Objects marked ``difficult`` are left out of training, as Fast R-CNN's VOC loader does.
5. Test: every proposal is scored and regressed; per class, detections above a small score
   threshold go through non-maximum suppression; at most ``max_detections`` per image are kept;
   boxes go back to the original image's VOC pixel coordinates and
   ``itl_ray.metrics.detection_ap`` scores each class (difficult objects ignored, 11-point AP).

**Assumptions** beyond the proposals (the study does not give its Fast R-CNN settings; each is a
``DetectionConfig`` field): the schedule is a few epochs instead of Fast R-CNN's 40k + 10k
iterations, with a 10x larger learning rate (``conv_lr_scale`` can slow the convolutions down);
RoI Align followed by 2x2 max pooling stands in for RoI max
pooling (same output grid, smoother sampling).

What to expect on small images: a backbone pretrained at 64 px has g = 1, so a region is one
max-pooled vector with no layout inside it. Such a detector knows what a region contains
better than where the object's edges are, and its box regression has little to go on; at
resolution 96 g is 2, at 128 it is 3 (see ``itl_ray.models.pool5_grid``).

Classes with no non-difficult object in the test images have no AP: they are left out of the
mean and their ``voc07_det_ap/<class>`` key is omitted (not NaN, which tracking backends and
tables handle badly); a log line names them.

Boxes inside this module are in the scaled image's pixel-index coordinates (0-based, corners
inclusive: a box from x1 to x2 covers x2 - x1 + 1 pixels, VOC's convention minus one), as in
Fast R-CNN.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from itl_ray.bounds import Ge, Gt, Interval, MinLen
from torch import nn
from torchvision.ops import nms, roi_align

from itl_ray.datasets.voc import VOC_CLASSES, VocImage, VocObject
from itl_ray.errors import UserError
from itl_ray.images import decode_rgb, normalize, resize_uint8
from itl_ray.metrics import box_iou, detection_ap, mean_ap
from itl_ray.models import AlexNet

# conv5's stride in pixels (conv1 stride 4, pool1 and pool2 stride 2).
CONV5_STRIDE = 16
# Where conv5 cell j sits in the image: conv1 (11x11, stride 4, no padding) centres output i on
# pixel 4i + 5; each 3x3 stride-2 pool centres output j on input 2j + 1, so pool1 gives 8j + 9 and
# pool2 16j + 17; conv2..conv5 keep positions. RoI Align (aligned=True) puts cell j at continuous
# coordinate 16j + 8, so regions are shifted by this many pixels to line up with the cells.
CONV5_OFFSET = 17.5 - 8.0

Fraction = Annotated[float, Interval(ge=0, le=1)]  # a probability, an IoU or a share, 0..1
Positive = Annotated[float, Gt(0)]


@dataclass(frozen=True)
class DetectionConfig:
    """Fast R-CNN's VOC 2007 recipe, scaled to small images. Defaults suit the mini-benchmark
    (images about 128 px); for the real VOC 2007 use image_size 600, max_size 1000 and more epochs.
    """

    # Shorter image side after scaling, px. Fast R-CNN scales VOC's ~500x375 images to 600 (2.6x
    # its 227 px pretraining input); the mini-benchmark's images (shorter side 112..144 px) stay
    # near their size: larger helps a little (objects span more conv5 cells) and costs conv time.
    image_size: Annotated[int, Ge(1)] = 128
    # Longer side cap, px: an elongated image is scaled down further so it fits (Fast R-CNN: 1000
    # for 600).
    max_size: Annotated[int, Ge(1)] = 213
    # Passes over trainval. Fast R-CNN: 40k + 10k iterations of 2 images, about 20 passes over
    # the 5011 trainval images; short here to stay cheap on CPU (one pass over 250 images of
    # ~140 px takes about 4.5 s on one thread at width 0.25).
    epochs: Annotated[int, Ge(0)] = 4
    # Images per SGD step (Fast R-CNN: 2; all regions of a step come from these images).
    batch_size: Annotated[int, Ge(1)] = 2
    # Learning rate of the pretrained layers. Fast R-CNN used 0.001 for 40k iterations; with a
    # few hundred iterations here the step must be larger.
    lr: Annotated[float, Gt(0)] = 0.01
    # Learning rate multiplier of conv1..conv5; 1.0 fine-tunes every layer alike, as the study
    # did. With only a few hundred steps a smaller value keeps more of what pretraining taught the
    # convolutions: on the mini-benchmark (sweeps/smoke.yaml uses 0.1), a backbone pretrained on
    # 10 classes x 40 images scored 3.6 mAP against 0.7 for random initialisation at 0.1, where
    # 1.0 gave 0.1 and 0.3, and frozen convolutions (0.0) 2.0 and 1.4.
    conv_lr_scale: Annotated[float, Ge(0)] = 1.0
    # The learning rate is divided by 10 after this fraction of the epochs (Fast R-CNN: 40k of
    # 50k iterations).
    lr_drop_at: Fraction = 0.75
    # SGD momentum and L2 weight decay, Caffe's AlexNet and Fast R-CNN values.
    momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Ge(0)] = 5e-4
    # Sampled regions per training image (Fast R-CNN: 128 per minibatch of 2 images).
    rois_per_image: Annotated[int, Ge(1)] = 64
    # Largest fraction of the sampled regions that are foreground (Fast R-CNN: 0.25).
    fg_fraction: Fraction = 0.25
    # IoU with a ground-truth box from which a region is foreground (Fast R-CNN: 0.5).
    fg_iou: Fraction = 0.5
    # Background regions have a best IoU in [bg_iou_low, bg_iou_high) (Fast R-CNN: [0.1, 0.5)):
    # the lower bound is a heuristic hard-negative mining, regions near objects teach more.
    bg_iou_low: Fraction = 0.1
    bg_iou_high: Fraction = 0.5
    # Random horizontal flip of each training image, probability (Fast R-CNN trains on trainval
    # plus its mirror images).
    flip_probability: Fraction = 0.5
    # Sliding-window proposals (in place of Selective Search): window sides as fractions of the
    # image's shorter side, from small objects to nearly the whole image; consecutive sizes
    # differ by ~1.5x so an object between two sizes still overlaps one of them by IoU ~0.65.
    # (For real VOC images add smaller sizes: VOC has many objects under a quarter of the image.)
    window_sizes: Annotated[tuple[Annotated[float, Interval(gt=0, le=1)], ...], MinLen(1)] = (0.25, 0.4, 0.6, 0.85)
    # Window aspect ratios, width / height (VOC objects range from tall people to long trains).
    window_ratios: Annotated[tuple[Annotated[float, Gt(0)], ...], MinLen(1)] = (0.5, 1.0, 2.0)
    # Step between neighbouring windows as a fraction of the window's extent in that direction.
    # At 0.5 about 99% of objects within the listed sizes and ratios have a window with IoU >= 0.5
    # (the worst about 0.45; box regression corrects the rest) from ~330 windows per 128x170
    # image; 1/3 lifts the worst to 0.53 but doubles the windows every test image must score.
    window_stride: Annotated[float, Gt(0)] = 0.5
    # Standard deviations the box regression targets are divided by (Fast R-CNN's
    # BBOX_NORMALIZE_STDS), so the four targets weigh about the same in the loss.
    box_target_stds: tuple[Positive, Positive, Positive, Positive] = (0.1, 0.1, 0.2, 0.2)
    # Test: a class's detection is kept from this softmax score on (low: AP rewards recall, and
    # low-scored detections come last in the ranking, so they can only add to AP).
    score_threshold: Fraction = 0.01
    # Test: non-maximum suppression IoU per class (Fast R-CNN: 0.3).
    nms_iou: Fraction = 0.3
    # Test: at most this many detections per image over all classes (Fast R-CNN: 100).
    max_detections: Annotated[int, Ge(1)] = 100

    def check(self) -> None:
        """The rules between fields (bounds and choices are declared on the fields): ValueError
        naming the fields."""
        if self.max_size < self.image_size:
            raise ValueError(f"max_size ({self.max_size}) must be at least image_size ({self.image_size})")
        if not self.bg_iou_low < self.bg_iou_high:
            raise ValueError(f"bg_iou_low ({self.bg_iou_low:g}) must be below bg_iou_high ({self.bg_iou_high:g})")


@dataclass(frozen=True)
class DetectionRuntime:
    """How fast detection runs, not what it computes (the trial config's ``runtime.detection``; not
    part of ``trial_id``)."""

    # Test images per forward pass (no gradients; larger uses more memory). A batch is padded at
    # the bottom and right to its largest image with the mean colour (as Fast R-CNN pads), so only
    # regions at an image's padded edges can score differently with another batch size.
    test_batch_size: Annotated[int, Ge(1)] = 8


# ----------------------------------------------------------------------------------------------
# Boxes


def _centres_and_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    widths = boxes[:, 2] - boxes[:, 0] + 1
    heights = boxes[:, 3] - boxes[:, 1] + 1
    return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights


def encode_boxes(proposals: torch.Tensor, targets: torch.Tensor, stds: tuple[float, ...]) -> torch.Tensor:
    """Regression targets (N x 4) that move each proposal onto its target box (R-CNN's
    parametrisation: centre shift in units of the proposal's size, log of the size ratio),
    divided by ``stds``."""
    px, py, pw, ph = _centres_and_sizes(proposals)
    tx, ty, tw, th = _centres_and_sizes(targets)
    deltas = torch.stack(((tx - px) / pw, (ty - py) / ph, torch.log(tw / pw), torch.log(th / ph)), dim=1)
    return deltas / deltas.new_tensor(stds)


# The largest log size ratio applied at test (Detectron's value): keeps exp() finite.
MAX_LOG_RATIO = math.log(1000 / 16)


def decode_boxes(proposals: torch.Tensor, deltas: torch.Tensor, stds: tuple[float, ...]) -> torch.Tensor:
    """Inverse of ``encode_boxes``: the boxes (N x 4) that ``deltas`` (N x 4) make of the proposals."""
    deltas = deltas * deltas.new_tensor(stds)
    px, py, pw, ph = _centres_and_sizes(proposals)
    cx = px + deltas[:, 0] * pw
    cy = py + deltas[:, 1] * ph
    w = pw * torch.exp(deltas[:, 2].clamp(max=MAX_LOG_RATIO))
    h = ph * torch.exp(deltas[:, 3].clamp(max=MAX_LOG_RATIO))
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w - 1, cy + 0.5 * h - 1), dim=1)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes clipped to the image (pixel indices 0..width-1, 0..height-1)."""
    x = boxes[:, 0::2].clamp(0, width - 1)
    y = boxes[:, 1::2].clamp(0, height - 1)
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def _window_starts(extent: int, window: float, step: float) -> torch.Tensor:
    """Start positions of windows along one axis, evenly spaced from 0 to the last position
    that fits, no further apart than ``step``, so the first and last windows touch the edges."""
    room = extent - window
    count = math.ceil(room / step - 1e-9) + 1 if room > 0 else 1
    return torch.linspace(0, max(room, 0.0), count, dtype=torch.float64)


def sliding_window_proposals(height: int, width: int, config: DetectionConfig) -> torch.Tensor:
    """Proposals for an image of this size: every window of ``config.window_sizes`` (fractions of
    the shorter side) and ``config.window_ratios`` (width / height, same area as the square),
    slid over the image with a step of ``config.window_stride`` times the window's extent.
    Windows larger than the image are cut to it; duplicates are removed. N x 4 float32,
    pixel-index coordinates, in a fixed order."""
    shorter = min(height, width)
    windows = []
    for size in config.window_sizes:
        side = size * shorter
        for ratio in config.window_ratios:
            window_width = min(side * math.sqrt(ratio), width)
            window_height = min(side / math.sqrt(ratio), height)
            xs = _window_starts(width, window_width, config.window_stride * window_width)
            ys = _window_starts(height, window_height, config.window_stride * window_height)
            y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
            x0, y0 = x0.reshape(-1), y0.reshape(-1)
            windows.append(torch.stack((x0, y0, x0 + window_width - 1, y0 + window_height - 1), dim=1))
    boxes = torch.cat(windows).round()  # whole pixels, so cut-off duplicates compare equal
    return torch.unique(boxes, dim=0).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# The detector


class FastRCNN(nn.Module):
    """AlexNet conv1..conv5 -> RoI pooling to pool5's grid -> fc6, fc7 -> class scores and boxes."""

    def __init__(self, backbone: AlexNet, num_classes: int, generator: torch.Generator):
        super().__init__()
        self.features = backbone.features
        self.grid = backbone.grid
        self.embed = backbone.embed
        self.num_classes = num_classes
        self.classifier = nn.Linear(backbone.embed_dim, num_classes + 1)
        self.box_regressor = nn.Linear(backbone.embed_dim, 4 * num_classes)
        # Fast R-CNN's initialisation of the new layers: Gaussian, std 0.01 and 0.001, zero bias.
        nn.init.normal_(self.classifier.weight, std=0.01, generator=generator)
        nn.init.normal_(self.box_regressor.weight, std=0.001, generator=generator)
        nn.init.zeros_(self.classifier.bias)
        nn.init.zeros_(self.box_regressor.bias)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` B x 3 x H x W (normalised); ``rois`` K x 5 (batch index, x1, y1, x2, y2 in
        pixel-index coordinates). Returns class logits K x (C + 1) and box deltas K x C x 4."""
        conv5 = self.features(images)
        # Continuous coordinates: a box of pixels x1..x2 spans [x1, x2 + 1), then shifted to the
        # conv5 cells' image positions (see CONV5_OFFSET).
        regions = rois.clone()
        regions[:, 3:5] += 1
        regions[:, 1:5] -= CONV5_OFFSET
        pooled = roi_align(conv5, regions, output_size=2 * self.grid, spatial_scale=1 / CONV5_STRIDE,
                           sampling_ratio=2, aligned=True)
        pooled = F.max_pool2d(pooled, kernel_size=2)
        fc7 = self.embed(pooled)
        return self.classifier(fc7), self.box_regressor(fc7).view(-1, self.num_classes, 4)


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class _Image:
    """One image decoded and scaled, with its objects in the scaled image's coordinates."""

    image_id: str
    pixels: torch.Tensor  # uint8 3 x H x W
    scale_x: float  # scaled width / original width
    scale_y: float
    boxes: torch.Tensor  # K x 4, float32, scaled pixel-index coordinates
    labels: torch.Tensor  # K, int64, 1..20 (0 is background)
    difficult: torch.Tensor  # K, bool
    objects: tuple[VocObject, ...]  # the same objects as annotated (original VOC coordinates)


def _scaled_size(height: int, width: int, config: DetectionConfig) -> tuple[int, int]:
    scale = min(config.image_size / min(height, width), config.max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _load(images: list[VocImage], config: DetectionConfig) -> list[_Image]:
    """Decode and scale every image once (``images.resize_uint8``)."""
    loaded = []
    for image in images:
        pixels = decode_rgb(image.jpeg, image.image_id)
        height, width = pixels.shape[-2:]
        new_height, new_width = _scaled_size(height, width, config)
        scaled = resize_uint8(pixels, new_height, new_width)
        scale_x, scale_y = new_width / width, new_height / height
        objects = [obj for obj in image.objects if obj.name in VOC_CLASSES]
        # VOC boxes are 1-based: pixel index = VOC coordinate - 1, then scaled.
        boxes = torch.tensor([[obj.box[0] - 1, obj.box[1] - 1, obj.box[2] - 1, obj.box[3] - 1] for obj in objects],
                             dtype=torch.float32).reshape(-1, 4)
        boxes = boxes * torch.tensor([scale_x, scale_y, scale_x, scale_y])
        loaded.append(_Image(
            image_id=image.image_id,
            pixels=scaled,
            scale_x=scale_x,
            scale_y=scale_y,
            boxes=clip_boxes(boxes, new_height, new_width),
            labels=torch.tensor([VOC_CLASSES.index(obj.name) + 1 for obj in objects], dtype=torch.int64),
            difficult=torch.tensor([obj.difficult for obj in objects], dtype=torch.bool),
            objects=tuple(objects),
        ))
    return loaded


def _batch_pixels(pixels: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Normalise images and pad them at the bottom and right to one size. Padding is 0 after
    normalisation, the mean colour (Fast R-CNN pads mean-subtracted images with 0 too)."""
    height = max(image.shape[1] for image in pixels)
    width = max(image.shape[2] for image in pixels)
    batch = torch.zeros((len(pixels), 3, height, width), device=device)
    for index, image in enumerate(pixels):
        batch[index, :, : image.shape[1], : image.shape[2]] = normalize(image[None].to(device))[0]
    return batch


class _Proposals:
    """Sliding-window proposals per image size, computed once per size."""

    def __init__(self, config: DetectionConfig):
        self.config = config
        self.cache: dict[tuple[int, int], torch.Tensor] = {}

    def __call__(self, height: int, width: int) -> torch.Tensor:
        if (height, width) not in self.cache:
            self.cache[(height, width)] = sliding_window_proposals(height, width, self.config)
        return self.cache[(height, width)]


# ----------------------------------------------------------------------------------------------
# Training


def _flip(image: _Image) -> tuple[torch.Tensor, torch.Tensor]:
    """The image mirrored left-right, and its boxes mirrored with it."""
    width = image.pixels.shape[2]
    boxes = image.boxes.clone()
    boxes[:, 0] = width - 1 - image.boxes[:, 2]
    boxes[:, 2] = width - 1 - image.boxes[:, 0]
    return image.pixels.flip(-1), boxes


def sample_rois(
    proposals: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    config: DetectionConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fast R-CNN's region sampling for one training image.

    The ground-truth boxes join the proposals; each region takes the label of the box it overlaps
    most. Up to ``fg_fraction`` of ``rois_per_image`` regions are drawn from the foreground
    (IoU >= fg_iou), the rest from the background (IoU in [bg_iou_low, bg_iou_high), label 0).
    An image with no such background (no objects, or none near any window) draws its background
    from all regions below bg_iou_high instead, so it still teaches what is not an object.
    Returns regions R x 4, labels R, and the box each region regresses to, R x 4 (its best
    ground-truth box; meaningless for background).
    """
    candidates = torch.cat((proposals, gt_boxes)) if len(gt_boxes) else proposals
    if len(gt_boxes):
        overlaps = box_iou(candidates, gt_boxes)
        best_iou, best_gt = overlaps.max(dim=1)
        labels = gt_labels[best_gt]
        targets = gt_boxes[best_gt]
    else:
        best_iou = torch.zeros(len(candidates))
        labels = torch.zeros(len(candidates), dtype=torch.int64)
        targets = candidates.clone()
    foreground = torch.nonzero(best_iou >= config.fg_iou).flatten()
    background = torch.nonzero((best_iou >= config.bg_iou_low) & (best_iou < config.bg_iou_high)).flatten()
    if len(background) == 0:
        background = torch.nonzero(best_iou < config.bg_iou_high).flatten()
    fg_count = min(round(config.fg_fraction * config.rois_per_image), len(foreground))
    bg_count = min(config.rois_per_image - fg_count, len(background))
    foreground = foreground[torch.randperm(len(foreground), generator=generator)[:fg_count]]
    background = background[torch.randperm(len(background), generator=generator)[:bg_count]]
    keep = torch.cat((foreground, background))
    sampled_labels = labels[keep].clone()
    sampled_labels[fg_count:] = 0
    return candidates[keep], sampled_labels, targets[keep]


def _train_step_batch(
    batch: list[_Image], proposals: _Proposals, config: DetectionConfig, generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (flipped at random), sampled regions, their labels and regression targets."""
    pixels, rois, labels, box_targets = [], [], [], []
    for index, image in enumerate(batch):
        flip = torch.rand((), generator=generator).item() < config.flip_probability
        image_pixels, gt_boxes = _flip(image) if flip else (image.pixels, image.boxes)
        trainable = ~image.difficult  # Fast R-CNN leaves difficult objects out of training
        regions, region_labels, region_targets = sample_rois(
            proposals(image.pixels.shape[1], image.pixels.shape[2]), gt_boxes[trainable], image.labels[trainable],
            config, generator)
        pixels.append(image_pixels)
        rois.append(torch.cat((torch.full((len(regions), 1), float(index)), regions), dim=1))
        labels.append(region_labels)
        box_targets.append(encode_boxes(regions, region_targets, config.box_target_stds))
    return (_batch_pixels(pixels, device), torch.cat(rois).to(device), torch.cat(labels).to(device),
            torch.cat(box_targets).to(device))


def _detection_loss(
    logits: torch.Tensor, deltas: torch.Tensor, labels: torch.Tensor, box_targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax cross-entropy over all regions, and smooth L1 (beta 1) between the foreground
    regions' deltas for their own class and their targets, summed over the four numbers and
    averaged over all regions (Fast R-CNN's normalisation)."""
    classification = F.cross_entropy(logits, labels)
    foreground = torch.nonzero(labels > 0).flatten()
    own_class = deltas[foreground, labels[foreground] - 1]
    regression = F.smooth_l1_loss(own_class, box_targets[foreground], beta=1.0, reduction="sum") / len(labels)
    return classification, regression


def _train(model: FastRCNN, images: list[_Image], proposals: _Proposals, config: DetectionConfig,
           generator: torch.Generator, device: torch.device, log, curve=None) -> None:
    conv = list(model.features.parameters())
    conv_ids = {id(p) for p in conv}
    rest = [p for p in model.parameters() if id(p) not in conv_ids]
    groups = [{"params": conv, "scale": config.conv_lr_scale}, {"params": rest, "scale": 1.0}]
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    drop_epoch = math.ceil(config.lr_drop_at * config.epochs)
    for epoch in range(config.epochs):
        model.train()
        lr = config.lr if epoch < drop_epoch else config.lr / 10
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        order = torch.randperm(len(images), generator=generator).tolist()
        totals = torch.zeros(2)
        steps = 0
        started = time.perf_counter()
        for first in range(0, len(order), config.batch_size):
            batch = [images[index] for index in order[first : first + config.batch_size]]
            pixels, rois, labels, box_targets = _train_step_batch(batch, proposals, config, generator, device)
            if len(rois) == 0:
                continue
            logits, deltas = model(pixels, rois)
            classification, regression = _detection_loss(logits, deltas, labels, box_targets)
            loss = classification + regression
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            totals += torch.tensor([classification.item(), regression.item()])
            steps += 1
        classification, regression = (totals / max(steps, 1)).tolist()
        log(f"detection epoch {epoch + 1}/{config.epochs}: loss {classification + regression:.4f} "
            f"(classification {classification:.4f}, box {regression:.4f}), lr {lr:g}, "
            f"{time.perf_counter() - started:.1f}s")
        if curve is not None:
            curve({"detection/loss": classification + regression, "detection/lr": lr}, epoch + 1)


# ----------------------------------------------------------------------------------------------
# Test


@torch.no_grad()
def _detect(model: FastRCNN, images: list[_Image], proposals: _Proposals, config: DetectionConfig,
            device: torch.device, batch_size: int) -> dict[int, list[tuple[str, float, tuple[float, float, float, float]]]]:
    """Detections per class index (1..C): (image id, score, box in original VOC coordinates)."""
    model.eval()
    detections: dict[int, list] = {label: [] for label in range(1, model.num_classes + 1)}
    for first in range(0, len(images), batch_size):
        batch = images[first : first + batch_size]
        windows = [proposals(image.pixels.shape[1], image.pixels.shape[2]) for image in batch]
        rois = torch.cat([torch.cat((torch.full((len(boxes), 1), float(index)), boxes), dim=1)
                          for index, boxes in enumerate(windows)])
        logits, deltas = model(_batch_pixels([image.pixels for image in batch], device), rois.to(device))
        scores = logits.softmax(dim=1).cpu()
        deltas = deltas.cpu()
        start = 0
        for image, boxes in zip(batch, windows):
            end = start + len(boxes)
            detections_of_image = _detect_in_image(image, boxes, scores[start:end], deltas[start:end], config)
            for label, score, box in detections_of_image:
                detections[label].append((image.image_id, score, box))
            start = end
    return detections


def _detect_in_image(image: _Image, proposals: torch.Tensor, scores: torch.Tensor, deltas: torch.Tensor,
                     config: DetectionConfig) -> list[tuple[int, float, tuple[float, float, float, float]]]:
    """Per class: regress, clip, threshold, NMS; then the best ``max_detections`` over all
    classes, as (class index, score, box in the original image's VOC coordinates)."""
    height, width = image.pixels.shape[1:]
    found_labels, found_scores, found_boxes = [], [], []
    for label in range(1, scores.shape[1]):
        keep = torch.nonzero(scores[:, label] >= config.score_threshold).flatten()
        if len(keep) == 0:
            continue
        boxes = clip_boxes(decode_boxes(proposals[keep], deltas[keep, label - 1], config.box_target_stds),
                           height, width)
        class_scores = scores[keep, label]
        # torchvision's nms measures areas as (x2 - x1) * (y2 - y1): pass the boxes' pixel
        # extents so it uses VOC's inclusive-corner areas.
        extents = boxes + torch.tensor([0.0, 0.0, 1.0, 1.0])
        kept = nms(extents, class_scores, config.nms_iou)
        found_labels.append(torch.full((len(kept),), label))
        found_scores.append(class_scores[kept])
        found_boxes.append(boxes[kept])
    if not found_scores:
        return []
    labels, scores, boxes = torch.cat(found_labels), torch.cat(found_scores), torch.cat(found_boxes)
    best = torch.argsort(scores, descending=True, stable=True)[: config.max_detections]
    # Back to the original image: undo the scaling, then pixel index + 1 = VOC coordinate.
    scale = torch.tensor([image.scale_x, image.scale_y, image.scale_x, image.scale_y])
    voc_boxes = boxes[best] / scale + 1
    return [(int(labels[index]), float(scores[index]), tuple(float(value) for value in box))
            for index, box in zip(best.tolist(), voc_boxes)]


# ----------------------------------------------------------------------------------------------
# The task


def evaluate_detection(
    backbone: AlexNet,
    trainval: list[VocImage],
    test: list[VocImage],
    config: DetectionConfig,
    device: torch.device,
    seed: int,
    log=print,
    curve=None,
    runtime: DetectionRuntime = DetectionRuntime(),
) -> dict[str, float]:
    """Fine-tune a copy of ``backbone`` as a Fast R-CNN detector on ``trainval`` and measure it on
    ``test``. Returns percent: ``voc07_det_map`` and ``voc07_det_ap/<class>`` for each VOC class
    that has a non-difficult object in ``test`` (the others are logged and left out). ``runtime``:
    how fast, not what (``DetectionRuntime``).

    The caller's backbone is not modified. Runs are deterministic for a seed on CPU: every random
    draw comes from ``seed`` (global RNG state, which dropout uses, is restored afterwards).
    ``curve`` (when given) gets ``detection/loss`` (the epoch's mean classification + box loss)
    and ``detection/lr`` (the rate of fc6 onwards; the conv layers' is ``conv_lr_scale`` times it)
    at step = epoch.
    """
    if not trainval:
        raise UserError("the VOC 2007 trainval split is empty: the detector has nothing to train on")
    if not test:
        raise UserError("the VOC 2007 test split is empty: there is nothing to measure detection on")
    started = time.perf_counter()
    train_images = _load(trainval, config)
    test_images = _load(test, config)
    proposals = _Proposals(config)
    log(f"detection: {len(train_images)} trainval and {len(test_images)} test images decoded "
        f"({time.perf_counter() - started:.1f}s), about "
        f"{len(proposals(test_images[0].pixels.shape[1], test_images[0].pixels.shape[2]))} proposals per image")

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)  # dropout draws from the global generator
        generator = torch.Generator().manual_seed(seed)
        model = FastRCNN(copy.deepcopy(backbone), len(VOC_CLASSES), generator).to(device)
        _train(model, train_images, proposals, config, generator, device, log, curve)
        detections = _detect(model, test_images, proposals, config, device, runtime.test_batch_size)

    metrics: dict[str, float] = {}
    aps = []
    absent = []
    for label, name in enumerate(VOC_CLASSES, start=1):
        ground_truth = {image.image_id: [(obj.box, obj.difficult) for obj in image.objects if obj.name == name]
                        for image in test_images}
        ap = detection_ap(detections[label], ground_truth, iou_threshold=0.5, eleven_point=True)
        if math.isnan(ap):
            absent.append(name)
            continue
        metrics[f"voc07_det_ap/{name}"] = 100 * ap
        aps.append(ap)
    if not aps:
        raise UserError("the VOC 2007 test images have no non-difficult object of any class: mAP is undefined")
    if absent:
        log(f"detection: no non-difficult test objects of {', '.join(absent)}: left out of the mean, "
            "no AP reported")
    metrics["voc07_det_map"] = 100 * mean_ap(aps)
    log(f"detection: mAP {metrics['voc07_det_map']:.1f} over {len(aps)} classes "
        f"({time.perf_counter() - started:.1f}s)")
    return metrics
