"""What the region-based transfer stages share: the pretrained AlexNet as a region network (whole
image through conv1..conv5, RoI pooling to pool5's grid, fc6 and fc7), Caffe's SGD with per-layer
learning-rate and weight-decay multipliers, the step schedule counted in iterations, and the
settings of that recipe (``RegionRecipe``).

PASCAL-DET (``detection.py``, Fast R-CNN, Girshick 2015) and PASCAL-ACT-CLS (``action.py``, R*CNN's
primary region, Gkioxari et al. 2015, built on the Fast R-CNN code) both train this way; the
sources of each default are in the stage's config docstring.

The network (Fast R-CNN's models/CaffeNet/train.prototxt):
- conv1..conv5 of the pretrained backbone with the detection net's padding: conv1 ``pad: 5``,
  pool1 and pool2 ``pad: 1`` (the ImageNet net has none). With it, conv5 cell k is centred on pixel
  16k, so that a box in pixels maps to conv5 cells by ``spatial_scale: 0.0625`` (1/16) alone.
- ``roi_pool5``: RoI max pooling of each box to pool5's grid (``pooled_w/h``: 6 at 227 px; the
  backbone's ``grid``), ``torchvision.ops.roi_pool`` (the Caffe layer's arithmetic: box corners
  rounded to cells, bins of ``ceil``/``floor`` edges). Setting ``roi_pool: align`` uses RoI Align
  instead (2g x 2g bilinear samples, then 2x2 max pooling: same output grid, smoother sampling).
- fc6 and fc7 as pretrained (their dropout included).

Images are normalised as in pretraining (``images.normalize``: ImageNet mean and std) rather than
Fast R-CNN's BGR mean subtraction: the backbone expects the input it was pretrained on. A batch of
images of different sizes is padded at the bottom and right with 0 after normalisation (Fast
R-CNN's ``im_list_to_blob`` pads mean-subtracted images with 0).
"""

from __future__ import annotations

import copy
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align, roi_pool

from itl_ray.bounds import Ge, Gt, Interval
from itl_ray.images import normalize
from itl_ray.models import AlexNet

CONV5_STRIDE = 16  # px per conv5 cell (conv1 stride 4, pool1 and pool2 stride 2)
RoiPool = Literal["max", "align"]
ROI_POOLS = typing.get_args(RoiPool)
# RoI Align (aligned=True) puts conv5 cell k at continuous coordinate 16k + 8; with the detection
# net's padding the cell is centred on pixel 16k, whose continuous centre is 16k + 0.5.
_ALIGN_SHIFT = 8.0 - 0.5


@dataclass(frozen=True)
class RegionRecipe:
    """Settings of a region-based fine-tuning (the defaults are Fast R-CNN's CaffeNet recipe; each
    stage's config subclass documents its own values and sources). Units: px, iterations (one SGD
    step on ``images_per_batch`` images), learning rates per iteration. Bounds and choices are
    declared on the fields (checked by ``config.from_dict``); ``check`` holds the rule between two."""

    image_size: Annotated[int, Ge(1)] = 600  # shorter side after scaling, px
    max_size: Annotated[int, Ge(1)] = 1000  # longer side cap, px
    iterations: Annotated[int, Ge(0)] = 40000  # SGD steps (0: none, the new layers stay as initialised)
    lr_step: Annotated[int, Ge(1)] = 30000  # the learning rate is divided by 10 at this iteration (Caffe's "step" policy)
    epochs: Annotated[int, Ge(0)] = 0  # > 0: count training in passes over the training images instead (see schedule)
    images_per_batch: Annotated[int, Ge(1)] = 2  # images per SGD step
    lr: Annotated[float, Gt(0)] = 0.001  # base learning rate (weights of every trained layer)
    momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Ge(0)] = 0.0005
    bias_lr_multiplier: Annotated[float, Ge(0)] = 2.0  # biases learn this much faster (prototxt: lr_mult 2)
    bias_decay_multiplier: Annotated[float, Ge(0)] = 0.0  # and decay this much (prototxt: decay_mult 0)
    frozen_convs: Annotated[int, Interval(ge=0, le=5)] = 1  # conv1..conv<k> are not trained (prototxt: lr_mult 0 on conv1)
    conv_lr_scale: Annotated[float, Ge(0)] = 1.0  # multiplier of the trained convolutions' learning rate
    head_lr_scale: Annotated[float, Ge(0)] = 1.0  # multiplier of the new layers' learning rate (Fast R-CNN, R*CNN: 1)
    flip_probability: Annotated[float, Interval(ge=0, le=1)] = 0.5  # random horizontal flip of each training image
    roi_pool: RoiPool = "max"  # max (RoI max pooling) or align (RoI Align + 2x2 max)

    def check(self) -> None:
        """The rule between fields: ValueError naming them."""
        if self.max_size < self.image_size:
            raise ValueError(f"max_size ({self.max_size}) must be at least image_size ({self.image_size})")


@dataclass(frozen=True)
class Schedule:
    """How long a region-based stage trains: ``iterations`` SGD steps, the learning rate divided by
    10 from iteration ``lr_step`` on."""

    iterations: int
    lr_step: int

    def lr(self, base: float, iteration: int) -> float:
        """Caffe's "step" policy: base * 0.1 ** floor(iteration / lr_step) (iteration from 0)."""
        return base * 0.1 ** (iteration // self.lr_step)


def schedule(recipe: RegionRecipe, train_images: int) -> Schedule:
    """The recipe's schedule for ``train_images`` usable training images: ``iterations`` and
    ``lr_step`` as set, or, with ``epochs`` > 0, that many passes of ``images_per_batch`` images
    (at least one step) with the learning-rate step at the same fraction of training
    (``lr_step / iterations``, 0.75 in Fast R-CNN's 30k of 40k)."""
    if recipe.epochs <= 0:
        return Schedule(recipe.iterations, recipe.lr_step)
    iterations = max(1, recipe.epochs * (train_images // max(1, min(recipe.images_per_batch, train_images))))
    fraction = min(1.0, recipe.lr_step / max(1, recipe.iterations))
    return Schedule(iterations, max(1, round(iterations * fraction)))


def training_plan(images: list[int], schedule: Schedule, images_per_batch: int, flip_probability: float,
                  generator: torch.Generator):
    """The images of each iteration, as (image index, flip) pairs, ``images_per_batch`` per
    iteration (fewer when there are fewer images): the indices in ``images`` go round in a new
    random order each pass (a pass's last, incomplete batch is left out, as Fast R-CNN's data layer
    reshuffles when fewer than a batch remain), each image flipped with ``flip_probability``.
    Draws only from ``generator``, as the plan is consumed."""
    per_batch = min(images_per_batch, len(images))
    done = 0
    while done < schedule.iterations:
        order = torch.randperm(len(images), generator=generator).tolist()
        for first in range(0, len(order) - per_batch + 1, per_batch):
            for position in order[first : first + per_batch]:
                yield images[position], bool(torch.rand((), generator=generator).item() < flip_probability)
            done += 1
            if done == schedule.iterations:
                return


def child_generator(seed: int, stream: int) -> torch.Generator:
    """A generator of its own for one stream of a stage's random draws (the stages use 0 for new
    layers' initialisation, 1 for the order and flips of training images, 2 for region sampling),
    from the stage's seed, so that how far ahead images are decoded never changes which numbers a
    draw gets."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % (2**63))


class RegionNetwork(nn.Module):
    """conv1..conv5 (with the detection net's padding), RoI pooling to the backbone's pool5 grid,
    then its fc6 and fc7: ``forward(images, rois)`` gives each region's fc7 features.

    Built from a copy of ``backbone`` (the caller's is not changed). ``images``: B x 3 x H x W,
    normalised; ``rois``: K x 5 (batch index, x1, y1, x2, y2 in the scaled images' 0-based pixel
    indices, corners inclusive). Returns K x ``embed_dim``."""

    def __init__(self, backbone: AlexNet, roi_pool: str = "max"):
        super().__init__()
        backbone = copy.deepcopy(backbone)
        self.features = backbone.features
        self.convs = [module for module in self.features if isinstance(module, nn.Conv2d)]
        pools = [module for module in self.features if isinstance(module, nn.MaxPool2d)]
        self.convs[0].padding = (5, 5)  # models/CaffeNet/train.prototxt: conv1 pad 5
        for pool in pools[:2]:
            pool.padding = 1  # pool1 and pool2 pad 1
        self.embed = backbone.embed
        self.embed_dim = backbone.embed_dim
        self.grid = backbone.grid
        if roi_pool not in ROI_POOLS:
            raise ValueError(f"roi_pool must be one of {ROI_POOLS}, got {roi_pool!r}")
        self.roi_pool = roi_pool

    def pooled(self, conv5: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """RoI pooling of ``rois`` (K x 5) from ``conv5``: K x C x grid x grid."""
        if self.roi_pool == "max":
            return roi_pool(conv5, rois, output_size=self.grid, spatial_scale=1 / CONV5_STRIDE)
        regions = rois.clone()
        regions[:, 3:5] += 1  # pixels x1..x2 span [x1, x2 + 1)
        regions[:, 1:5] += _ALIGN_SHIFT
        pooled = roi_align(conv5, regions, output_size=2 * self.grid, spatial_scale=1 / CONV5_STRIDE,
                           sampling_ratio=2, aligned=True)
        return F.max_pool2d(pooled, kernel_size=2)

    def forward(self, images: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return self.embed(self.pooled(self.features(images), rois))

    def freeze_convs(self, frozen: int) -> None:
        """Freeze conv1..conv<frozen> (no gradient, no decay: Caffe's lr_mult 0, decay_mult 0)."""
        for conv in self.convs[:frozen]:
            for parameter in conv.parameters():
                parameter.requires_grad_(False)


def caffe_sgd(model: nn.Module, conv_parameters: set[int], head_parameters: set[int],
              recipe: RegionRecipe) -> torch.optim.SGD:
    """SGD over ``model``'s trainable parameters with Caffe's per-parameter multipliers: weights at
    the base rate and full weight decay, biases at ``bias_lr_multiplier`` x the rate and
    ``bias_decay_multiplier`` x the decay (the prototxt's lr_mult 1/2, decay_mult 1/0), convolution
    parameters (ids in ``conv_parameters``) at ``conv_lr_scale`` x, the new layers' (ids in
    ``head_parameters``) at ``head_lr_scale`` x. Each group's ``lr_mult`` is applied by ``set_lr``.
    (PyTorch's momentum applies the rate after the velocity, Caffe's before; the two differ only
    for a few iterations after the rate changes.)"""
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        bias = parameter.ndim == 1
        lr_mult = (recipe.bias_lr_multiplier if bias else 1.0) * (
            recipe.conv_lr_scale if id(parameter) in conv_parameters else 1.0) * (
            recipe.head_lr_scale if id(parameter) in head_parameters else 1.0)
        decay = recipe.weight_decay * (recipe.bias_decay_multiplier if bias else 1.0)
        groups.setdefault((lr_mult, decay), []).append(parameter)
    return torch.optim.SGD([{"params": params, "lr_mult": lr_mult, "weight_decay": decay}
                            for (lr_mult, decay), params in groups.items()],
                           lr=recipe.lr, momentum=recipe.momentum)


def set_lr(optimizer: torch.optim.SGD, lr: float) -> None:
    """Set every group's rate to ``lr`` x its ``lr_mult``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


def image_batch(pixels: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """uint8 3 x H x W images -> one normalised float batch (B x 3 x maxH x maxW) on ``device``,
    each padded at the bottom and right with 0 (after normalisation)."""
    height = max(image.shape[1] for image in pixels)
    width = max(image.shape[2] for image in pixels)
    batch = torch.zeros((len(pixels), 3, height, width), device=device)
    for index, image in enumerate(pixels):
        batch[index, :, : image.shape[1], : image.shape[2]] = normalize(image[None].to(device))[0]
    return batch


def flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Boxes (K x 4, 0-based pixel indices, corners inclusive) mirrored left-right in an image
    ``width`` px wide (Fast R-CNN's imdb.append_flipped_images: x1' = W - x2 - 1, x2' = W - x1 - 1)."""
    flipped = boxes.clone()
    flipped[:, 0] = width - 1 - boxes[:, 2]
    flipped[:, 2] = width - 1 - boxes[:, 0]
    return flipped
