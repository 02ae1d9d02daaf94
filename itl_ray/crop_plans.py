"""The crop plan: an epoch's order, crops and flips, drawn from one seeded generator before any
image is decoded, and applied to one image.

A crop is planned in two stages, so that every executor (the fast loader's CPU threads, its batched
gather on the GPU, the torchvision pipeline's PIL transforms) cuts the same pixels: resize the whole
image to (resized_height, resized_width) (skipped when that is its size), cut the window (top, left,
height, width) out of it, resize the window to the resolution (skipped when it already is). A plan
is an int64 array with one row per image and the columns PLAN_COLUMNS, computed from the stored
sizes in the manifest. What a batch holds therefore depends on neither threads, timing nor device,
and a run resumed from its checkpoint draws what an uninterrupted one does.

Two recipes (``AUGMENTATIONS``):
- ``crop``: the study's (Caffe's) random crops of the image resized to ``short_side_for`` of the
  resolution and center-squared (models/bvlc_alexnet: random 227 px crops of 256 px images);
- ``random_resized_crop``: torchvision's RandomResizedCrop (8-100% of the area, aspect 3/4..4/3).
Validation uses the center window of the resized center square (``center_plan``).
"""

from __future__ import annotations

import math
import typing
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from itl_ray.images import short_side_for

Augment = Literal["crop", "random_resized_crop"]  # the recipes, as a setting declares them
AUGMENTATIONS = typing.get_args(Augment)
RRC_SCALE = (0.08, 1.0)  # random_resized_crop: fraction of the image's area (torchvision's defaults)
RRC_RATIO = (3 / 4, 4 / 3)  # aspect ratios (width / height)
RRC_TRIES = 10  # draws before falling back to a center crop, as torchvision

# One plan row per image, int64 (see the module docstring).
PLAN_COLUMNS = ("resized_height", "resized_width", "top", "left", "height", "width")


def draw_epoch(count: int, augment: str, resolution: int, batch_size: int,
               generator: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training epoch's random numbers from ``generator``: the order of the ``count`` images (a
    permutation, int64), then per image in that order the numbers its crop is made from (crop: Nx2
    int64 offsets; random_resized_crop: Nx22 float64 uniforms) and its flip (N bools).

    crop: per batch, the window's integer top and left in the resized center square, then the
    flips, exactly as this project's pretraining loop has always drawn them (so a seed trains on
    the crops it did before); random_resized_crop: 22 uniforms per image, then the flips."""
    order = torch.randperm(count, generator=generator).numpy()
    if augment == "crop":
        span = short_side_for(resolution) - resolution
        numbers, flips = np.empty((count, 2), dtype=np.int64), np.empty(count, dtype=bool)
        for start in range(0, count, batch_size):
            size = min(batch_size, count - start)
            numbers[start : start + size, 0] = torch.randint(0, span + 1, (size,), generator=generator).numpy()
            numbers[start : start + size, 1] = torch.randint(0, span + 1, (size,), generator=generator).numpy()
            flips[start : start + size] = (torch.rand(size, generator=generator) < 0.5).numpy()
        return order, numbers, flips
    uniforms = torch.rand((count, 2 * RRC_TRIES + 2), generator=generator, dtype=torch.float64).numpy()
    flips = (torch.rand(count, generator=generator) < 0.5).numpy()
    return order, uniforms, flips


def _round(values: np.ndarray) -> np.ndarray:
    return np.floor(values + 0.5).astype(np.int64)


def resized_sizes(heights: np.ndarray, widths: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) in px after resizing the shorter side to ``side``, rounded as
    ``images.resize_short_side`` does."""
    scale = side / np.minimum(heights, widths)
    return (np.maximum(side, np.round(heights * scale)).astype(np.int64),
            np.maximum(side, np.round(widths * scale)).astype(np.int64))


def _square_windows(heights, widths, resolution, tops, lefts) -> np.ndarray:
    """Windows at (tops, lefts) of the center square of each image resized to ``short_side_for``."""
    side = short_side_for(resolution)
    resized_h, resized_w = resized_sizes(heights, widths, side)
    crop = np.full(len(heights), resolution, dtype=np.int64)
    return np.stack([resized_h, resized_w, (resized_h - side) // 2 + tops, (resized_w - side) // 2 + lefts,
                     crop, crop], axis=1)


def crop_plan(offsets: np.ndarray, heights: np.ndarray, widths: np.ndarray, resolution: int) -> np.ndarray:
    """The study's (Caffe's) recipe as plan rows (Nx6 int64): shorter side resized to
    ``short_side_for(resolution)``, the resolution-px window at (top, left) = ``offsets`` (Nx2, drawn
    by ``draw_epoch``) of the center square."""
    return _square_windows(heights, widths, resolution, offsets[:, 0], offsets[:, 1])


def center_plan(heights: np.ndarray, widths: np.ndarray, resolution: int) -> np.ndarray:
    """Validation plan rows (Nx6 int64): resize the shorter side to ``short_side_for(resolution)``,
    take the center window (as ``images.center_crops(images.load_squares(...))``)."""
    middle = np.full(len(heights), (short_side_for(resolution) - resolution) // 2, dtype=np.int64)
    return _square_windows(heights, widths, resolution, middle, middle)


def resized_crop_plan(uniforms: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """random_resized_crop, as torchvision's RandomResizedCrop.get_params: up to 10 draws of area
    and aspect ratio, the first that fits wins, else a center crop of clamped ratio; the box is cut
    from the image as stored and resized to the resolution. ``uniforms``: Nx22 from ``draw_epoch``;
    returns plan rows, Nx6 int64."""
    area = (heights * widths).astype(np.float64)[:, None]
    scale = RRC_SCALE[0] + uniforms[:, :RRC_TRIES] * (RRC_SCALE[1] - RRC_SCALE[0])
    low, high = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    ratio = np.exp(low + uniforms[:, RRC_TRIES : 2 * RRC_TRIES] * (high - low))
    w = _round(np.sqrt(area * scale * ratio))
    h = _round(np.sqrt(area * scale / ratio))
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first = fits.argmax(axis=1)
    chosen = np.arange(len(first))
    box_h, box_w = h[chosen, first], w[chosen, first]
    missing = ~fits.any(axis=1)  # fallback: the whole image, cut to the nearest allowed aspect ratio
    if missing.any():
        in_ratio = widths / heights
        fallback_w = np.where(in_ratio > RRC_RATIO[1], _round(heights * RRC_RATIO[1]), widths)
        fallback_h = np.where(in_ratio < RRC_RATIO[0], _round(widths / RRC_RATIO[0]), heights)
        box_h, box_w = np.where(missing, fallback_h, box_h), np.where(missing, fallback_w, box_w)
    tops = np.minimum(np.floor(uniforms[:, -2] * (heights - box_h + 1)).astype(np.int64), heights - box_h)
    lefts = np.minimum(np.floor(uniforms[:, -1] * (widths - box_w + 1)).astype(np.int64), widths - box_w)
    tops = np.where(missing, (heights - box_h) // 2, tops)
    lefts = np.where(missing, (widths - box_w) // 2, lefts)
    return np.stack([heights, widths, tops, lefts, box_h, box_w], axis=1).astype(np.int64)


def train_plan(augment: str, numbers: np.ndarray, heights: np.ndarray, widths: np.ndarray,
               resolution: int) -> np.ndarray:
    """Plan rows (Nx6 int64) from ``draw_epoch``'s numbers for images of these stored sizes (px), by
    the ``augment`` recipe: ``crop_plan`` or ``resized_crop_plan``."""
    if augment == "crop":
        return crop_plan(numbers, heights, widths, resolution)
    return resized_crop_plan(numbers, heights, widths)


def epoch_plan(heights: np.ndarray, widths: np.ndarray, augment: str, resolution: int, batch_size: int,
               train: bool, generator: torch.Generator | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One epoch of images of these stored sizes (px), as every loader cuts it: the order (a
    permutation, int64), the plan rows in that order (Nx6 int64) and the flips (N bools).

    Training draws all three from ``generator`` (``draw_epoch``, then ``train_plan``); evaluation
    takes the images in order, center windows, no flips. Raises ValueError for a training epoch
    without a generator."""
    count = len(heights)
    if train:
        if generator is None:
            raise ValueError("a training epoch needs the generator its crops are drawn from")
        order, numbers, flips = draw_epoch(count, augment, resolution, batch_size, generator)
        return order, train_plan(augment, numbers, heights[order], widths[order], resolution), flips
    return np.arange(count), center_plan(heights, widths, resolution), np.zeros(count, dtype=bool)


def source_boxes(plan: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The plan's windows in the stored images' pixels: float Nx4 (top, left, height, width) for
    images of stored ``heights`` x ``widths``. Sampling them at the resolution is the same as
    resizing the image, then cutting the window."""
    scale_y, scale_x = heights / plan[:, 0], widths / plan[:, 1]
    return np.stack([plan[:, 2] * scale_y, plan[:, 3] * scale_x, plan[:, 4] * scale_y, plan[:, 5] * scale_x], axis=1)


def _resize_uint8_kernel(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torch's uint8 antialiased bilinear kernel (fixed point), as torchvision's transforms use on
    uint8 tensors: within one level of ``images.resize_uint8`` (which rounds a float32 result) and
    3-4 times faster (0.15 against 0.47 ms for a 100x90 image, 1.5 against 6.7 ms for 375x500 to
    256x341, one thread), which matters in the decode threads' hot path."""
    return F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


def crop_image(image: torch.Tensor, plan, flip: bool, size: int) -> torch.Tensor:
    """One plan row (PLAN_COLUMNS) applied to a uint8 3xHxW image: resize it, cut the window, resize
    that to ``size`` x ``size`` (uint8 antialiased bilinear, ``_resize_uint8_kernel``), flip when
    ``flip``. Returns uint8 3 x size x size."""
    resized_h, resized_w, top, left, height, width = (int(v) for v in plan)
    if image.shape[1] != resized_h or image.shape[2] != resized_w:
        image = _resize_uint8_kernel(image, resized_h, resized_w)
    window = image[:, top : top + height, left : left + width]
    if height != size or width != size:
        window = _resize_uint8_kernel(window, size, size)
    return window.flip(-1) if flip else window


