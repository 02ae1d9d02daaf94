"""The input pipeline: images stored as JPEG in prepared shards, read by manifest row, decoded and
cropped in batches, on the GPU where there is one.

Pretraining reads its images through one of two loaders (``PretrainConfig.pipeline``); both yield
normalised float batches on the training device and cut the same crops:

``FastLoader`` (pipeline ``fast``, the default)
  1. Plan. Each epoch, the main thread draws the order and every image's crop and flip from one
     seeded generator before anything is decoded, using the stored sizes in the manifest. A crop is
     a plan row: resize the image to (h, w), cut a window, resize that to the resolution (see
     PLAN_COLUMNS). What a batch holds depends on neither threads, timing nor device, and a run
     resumed from its checkpoint draws what an uninterrupted one does.
  2. Pixels, from one of three sources:
     - cache: a set that fits ``cache_gib`` is decoded once into uint8 squares (shorter side
       resized to 256/224 of the crop, center square: Caffe's ImageNet recipe, as ``load_squares``),
       kept on the training device; batches are cut from it (the demo's subsets go this way).
     - CPU threads: ``workers`` threads decode the JPEG bytes (torchvision.io's decoder releases the
       GIL: two threads decode twice as fast as one), apply the plan row (uint8 antialiased
       bilinear) and write into the batch's memory, ``prefetch`` batches ahead of the training
       step. The bytes are views of the memory-mapped shards: nothing is copied before decoding.
     - GPU: a producer thread, on its own CUDA stream, decodes each batch's JPEG list with nvJPEG
       (``torchvision.io.decode_jpeg(list, device="cuda")``) and crops, resizes and flips the whole
       batch in a few gathers (``resample``). A share of each batch (``cpu_decode_share``) goes to
       the CPU threads instead, so host cores and the GPU decode side by side; their crops reach
       the GPU from pinned memory by non-blocking copies on the same stream. The training stream
       waits on an event per batch, so batch n+1 is decoded while batch n trains.
  Batches come out in channels_last memory when asked (on CUDA).

``TorchvisionLoader`` (pipeline ``torchvision``, for comparison)
  The plain way: a torch Dataset over the shard rows, PIL decode, torchvision.transforms
  (resize, crop, flip, to tensor, normalize) in DataLoader worker processes, fed the same plan.

Where the time goes on a CPU (this project's 2-core machine, measured): JPEG decode dominates and
grows with the stored size (500x375: about 1 ms per image; 97x73: 0.1 ms), so shards prepared at
the shorter side the crops need (256 for 224 px, 73 for 64 px) are the main saving; PIL decodes
these small images at half torchvision.io's speed; a uint8 antialiased resize costs 0.04-0.3 ms;
Python costs a few microseconds per image. Decoding beside a CPU training step must not share its
cores: torch's OpenMP threads spin at barriers, and such steps ran up to 10x slower on a busy
machine (see ``FastLoader.decodes_while_training``). On a GPU, nvJPEG runs on the SMs that train
(../shared/reference/ANCHORS.md: SM-only decode caps AlexNet near 12.7k img/s at 256 px), hence
the CPU share and the option of smaller shards.
"""

from __future__ import annotations

import io
import math
import os
import queue
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from itl_ray.errors import UserError
from itl_ray.shards import Prepared

# torchvision 0.29 announces that its image decoders move to torchcodec; they still work here.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

# ImageNet's channel means and standard deviations (the usual torchvision values, in 0..1 units).
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

AUGMENTATIONS = ("crop", "random_resized_crop")
RRC_SCALE = (0.08, 1.0)  # random_resized_crop: fraction of the image's area (torchvision's defaults)
RRC_RATIO = (3 / 4, 4 / 3)  # aspect ratios (width / height)
RRC_TRIES = 10  # draws before falling back to a center crop, as torchvision
MAX_TAPS = 4  # samples per axis and output pixel when ``resample`` shrinks a box
CHUNK_ELEMENTS = 1 << 24  # ``resample`` gathers at most this many values at once (bounds GPU memory)


# ---------------------------------------------------------------------------------------------
# Single images (also used by the transfer tasks)
# ---------------------------------------------------------------------------------------------

def decode_rgb(data: bytes | torch.Tensor, name: str) -> torch.Tensor:
    """One encoded image (bytes, or a uint8 tensor of them) as a uint8 tensor 3xHxW; ``name`` names
    it in errors."""
    encoded = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(encoded, mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as error:
        raise UserError(f"cannot decode image {name} ({error}); prepare its dataset again") from None


def resize_short_side(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 3xHxW image so its shorter side is ``size`` (antialiased bilinear)."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = F.interpolate(image[None].float(), size=new_size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def center_square(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return image[:, top : top + size, left : left + size]


def load_squares(images: list[bytes], size: int) -> torch.Tensor:
    """Decode images, resize the shorter side to ``size`` and center-crop: uint8 Nx3xSxS."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for index, data in enumerate(images):
        out[index] = center_square(resize_short_side(decode_rgb(data, f"#{index}"), size), size)
    return out


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """uint8 Nx3xHxW -> float, ImageNet-normalised."""
    return (batch.float() / 255.0 - MEAN.to(batch.device)) / STD.to(batch.device)


def random_crops(batch: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``crop`` x ``crop`` window and a random horizontal flip per image (uint8 in, uint8 out)."""
    count, _, height, width = batch.shape
    tops = torch.randint(0, height - crop + 1, (count,), generator=generator)
    lefts = torch.randint(0, width - crop + 1, (count,), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    out = torch.empty((count, 3, crop, crop), dtype=batch.dtype)
    for index in range(count):
        window = batch[index, :, tops[index] : tops[index] + crop, lefts[index] : lefts[index] + crop]
        out[index] = window.flip(-1) if flips[index] else window
    return out


def center_crops(batch: torch.Tensor, crop: int) -> torch.Tensor:
    height, width = batch.shape[-2:]
    top, left = (height - crop) // 2, (width - crop) // 2
    return batch[:, :, top : top + crop, left : left + crop]


def short_side_for(resolution: int) -> int:
    """Shorter side an image is resized to before ``resolution`` px crops (256 for 224: ImageNet's ratio)."""
    return round(resolution * 256 / 224)


# ---------------------------------------------------------------------------------------------
# What a loader reads: rows of a prepared dataset, zero-copy
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRows:
    """Images of a prepared dataset chosen by manifest row, each with its class index."""

    data: Prepared
    rows: np.ndarray  # manifest rows (int64)
    labels: np.ndarray  # class index per row (int64)

    def __post_init__(self):
        rows, labels = np.asarray(self.rows, dtype=np.int64), np.asarray(self.labels, dtype=np.int64)
        if rows.ndim != 1 or rows.shape != labels.shape:
            raise ValueError(f"ImageRows: {rows.shape} rows but {labels.shape} labels")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.rows)

    def sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """Stored (height, width) of each image, from the manifest."""
        manifest = self.data.manifest
        return (manifest.column("height").to_numpy()[self.rows].astype(np.int64),
                manifest.column("width").to_numpy()[self.rows].astype(np.int64))


def _quiet_readonly_warning() -> None:
    """torch warns once per process that a tensor over read-only memory (the memory-mapped shards)
    must not be written; these tensors are only decoded. Spend that one warning here, silenced."""
    global _READONLY_WARNED
    if not _READONLY_WARNED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            readonly = np.zeros(1, dtype=np.uint8)
            readonly.flags.writeable = False
            torch.from_numpy(readonly)
        _READONLY_WARNED = True


_READONLY_WARNED = False


class ShardBytes:
    """JPEG bytes of manifest rows as uint8 tensors viewing the memory-mapped shards (``Prepared.views``)."""

    def __init__(self, data: Prepared):
        self.data = data

    def views(self, rows: np.ndarray) -> list[torch.Tensor]:
        """Tensors viewing the rows' bytes (read-only memory: the decoders only read them)."""
        _quiet_readonly_warning()
        return [torch.from_numpy(view) for view in self.data.views(rows)]


# ---------------------------------------------------------------------------------------------
# The plan: order, crops and flips, drawn before decoding
# ---------------------------------------------------------------------------------------------
# A crop is planned in two stages, so that every executor (CPU threads, the GPU gather, PIL) cuts
# the same pixels: resize the whole image to (resized_height, resized_width) (skipped when that is
# its size), cut the window (top, left, height, width) out of it, resize the window to the
# resolution (skipped when it already is). One row of int64 per image:
PLAN_COLUMNS = ("resized_height", "resized_width", "top", "left", "height", "width")


def draw_epoch(count: int, augment: str, resolution: int, batch_size: int,
               generator: torch.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training epoch's random numbers from ``generator``: the order of the images, then per
    image in that order the numbers its crop is made from and its flip.

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
    """Sizes after resizing the shorter side to ``side``, rounded as ``resize_short_side`` does."""
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
    """The study's (Caffe's) recipe: shorter side resized to ``short_side_for(resolution)``, the
    resolution-px window at (top, left) = ``offsets`` of the center square (drawn by ``draw_epoch``)."""
    return _square_windows(heights, widths, resolution, offsets[:, 0], offsets[:, 1])


def center_plan(heights: np.ndarray, widths: np.ndarray, resolution: int) -> np.ndarray:
    """Validation: resize the shorter side to ``short_side_for(resolution)``, take the center window
    (as ``center_crops(load_squares(...))``)."""
    middle = np.full(len(heights), (short_side_for(resolution) - resolution) // 2, dtype=np.int64)
    return _square_windows(heights, widths, resolution, middle, middle)


def resized_crop_plan(uniforms: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """random_resized_crop, as torchvision's RandomResizedCrop.get_params: up to 10 draws of area
    and aspect ratio, the first that fits wins, else a center crop of clamped ratio; the box is cut
    from the image as stored and resized to the resolution."""
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
    """Plan rows from ``draw_epoch``'s numbers for images of these stored sizes."""
    if augment == "crop":
        return crop_plan(numbers, heights, widths, resolution)
    return resized_crop_plan(numbers, heights, widths)


def source_boxes(plan: np.ndarray, heights: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The plan's windows in the stored image's pixels (float top, left, height, width): sampling
    them at the resolution is the same as resizing the image, then cutting the window."""
    scale_y, scale_x = heights / plan[:, 0], widths / plan[:, 1]
    return np.stack([plan[:, 2] * scale_y, plan[:, 3] * scale_x, plan[:, 4] * scale_y, plan[:, 5] * scale_x], axis=1)


# ---------------------------------------------------------------------------------------------
# Pixels: one image on a CPU thread, or a whole batch in one gather (GPU)
# ---------------------------------------------------------------------------------------------

def _resize_uint8(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(image[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]


def crop_image(image: torch.Tensor, plan, flip: bool, size: int) -> torch.Tensor:
    """One plan row applied to a uint8 3xHxW image: resize, cut the window, resize it to size x size
    (uint8 antialiased bilinear, as torchvision's transforms on tensors), flip."""
    resized_h, resized_w, top, left, height, width = (int(v) for v in plan)
    if image.shape[1] != resized_h or image.shape[2] != resized_w:
        image = _resize_uint8(image, resized_h, resized_w)
    window = image[:, top : top + height, left : left + width]
    if height != size or width != size:
        window = _resize_uint8(window, size, size)
    return window.flip(-1) if flip else window


def _name(rows: np.ndarray, index: int, folder) -> str:
    return f"row {rows[index]} of {folder}"


def _check_size(image: torch.Tensor, height: int, width: int, name: str) -> None:
    if image.shape[1] != height or image.shape[2] != width:
        raise UserError(f"image {name} is {image.shape[2]}x{image.shape[1]} px, but the manifest says "
                        f"{width}x{height}; prepare its dataset again")


def _decode_crops(views: list[torch.Tensor], rows: np.ndarray, folder, heights: np.ndarray, widths: np.ndarray,
                  plans: np.ndarray, flips: np.ndarray, size: int, out: torch.Tensor) -> None:
    """Worker thread: decode images and apply their plan rows (``crop_image``) into ``out``
    (k x 3 x size x size uint8)."""
    for index, data in enumerate(views):
        try:
            image = decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as error:
            raise UserError(f"cannot decode image {_name(rows, index, folder)} ({error}); prepare its dataset "
                            "again") from None
        _check_size(image, heights[index], widths[index], _name(rows, index, folder))
        out[index].copy_(crop_image(image, plans[index], bool(flips[index]), size))


def _decode_squares(views: list[torch.Tensor], rows: np.ndarray, folder, side: int, out: torch.Tensor) -> None:
    """Worker thread: decode, resize the shorter side to ``side`` and center-square (``load_squares``)."""
    for index, data in enumerate(views):
        out[index] = center_square(resize_short_side(decode_rgb(data, _name(rows, index, folder)), side), side)


def resample(flat: torch.Tensor, starts: np.ndarray, heights: np.ndarray, widths: np.ndarray, boxes: np.ndarray,
             flips: np.ndarray, size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Crop, resize and flip a batch of differently sized images in a few gathers (on any device).

    ``flat`` holds the uint8 images one after another, each 3xHxW (CHW order) from ``starts``;
    ``boxes`` are float (top, left, height, width) in each image's pixels (``source_boxes``).
    Returns float Nx3xSxS in 0..255,
    channels_last in memory (``out`` when given). Bilinear sampling at pixel centres, as
    F.interpolate(align_corners=False); a box more than 1.5x the output along an axis is sampled k
    times per output pixel along it and averaged (torchvision.ops.roi_align with aligned=True and
    sampling_ratio k), so shrinking does not alias. A box of exactly size x size is copied exactly.
    Images are grouped by their sampling counts and gathered in chunks of CHUNK_ELEMENTS values."""
    count = len(boxes)
    device = flat.device
    if out is None:
        out = torch.empty((count, 3, size, size), dtype=torch.float32, device=device,
                          memory_format=torch.channels_last)
    taps_y = np.clip(np.ceil(boxes[:, 2] / size - 0.5), 1, MAX_TAPS).astype(np.int64)
    taps_x = np.clip(np.ceil(boxes[:, 3] / size - 0.5), 1, MAX_TAPS).astype(np.int64)
    for taps in sorted(set(zip(taps_y.tolist(), taps_x.tolist()))):
        members = np.nonzero((taps_y == taps[0]) & (taps_x == taps[1]))[0]
        per_image = 3 * size * size * taps[0] * taps[1]
        step = max(1, CHUNK_ELEMENTS // per_image)
        for first in range(0, len(members), step):
            chosen = members[first : first + step]
            values = _resample_group(flat, starts[chosen], heights[chosen], widths[chosen], boxes[chosen],
                                     flips[chosen], size, *taps)
            if len(chosen) == chosen[-1] - chosen[0] + 1:
                out[int(chosen[0]) : int(chosen[-1]) + 1] = values
            else:
                out.index_copy_(0, _to_device(chosen, device), values)
    return out


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` in pinned memory when it is bound for a GPU (so its copy can be non-blocking)."""
    return tensor.pin_memory() if device.type == "cuda" else tensor


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device``: pinned, then copied without blocking this thread."""
    return _pinned(torch.from_numpy(np.ascontiguousarray(array)), device).to(device, non_blocking=True)


def _recorded(stream) -> torch.cuda.Event | None:
    """An event marking the work queued so far on a CUDA ``stream`` (None without one)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _resample_group(flat, starts, heights, widths, boxes, flips, size, taps_y, taps_x) -> torch.Tensor:
    """``resample`` for images sharing their sampling counts: float N x 3 x size x size (channels_last)."""
    device = flat.device
    count = len(boxes)
    ints = _to_device(np.stack([starts, heights, widths], axis=1).astype(np.int64), device)
    floats = _to_device(np.concatenate([boxes[:, :2], boxes[:, 2:] / size, flips[:, None]], axis=1)
                        .astype(np.float32), device)
    start, height, width = ints[:, 0], ints[:, 1], ints[:, 2]
    top, left, scale_y, scale_x, flip = (floats[:, i] for i in range(5))

    def positions(offset, scale, taps, limit):
        steps = (torch.arange(size * taps, device=device, dtype=torch.float32) + 0.5) / taps
        where = (offset[:, None] + steps[None, :] * scale[:, None] - 0.5).clamp(min=0)
        low = torch.minimum(where.floor().long(), (limit - 1)[:, None])
        high = torch.minimum(low + 1, (limit - 1)[:, None])
        return low, high, (where - low).clamp(0, 1)

    y0, y1, wy = positions(top, scale_y, taps_y, height)
    x0, x1, wx = positions(left, scale_x, taps_x, width)
    flipped = flip[:, None] > 0.5
    x0, x1, wx = (torch.where(flipped, v.flip(1), v) for v in (x0, x1, wx))
    rows, cols = size * taps_y, size * taps_x
    # Index of value (image, row, col, channel) in ``flat``: NHWC order, so the result is channels_last.
    channel = torch.arange(3, device=device)[None, :] * (height * width)[:, None]  # (N, 3)
    base = (start[:, None] + channel).view(count, 1, 1, 3)
    row0 = base + (y0 * width[:, None]).view(count, rows, 1, 1)
    row1 = base + (y1 * width[:, None]).view(count, rows, 1, 1)
    col0, col1 = x0.view(count, 1, cols, 1), x1.view(count, 1, cols, 1)
    wx, wy = wx.view(count, 1, cols, 1), wy.view(count, rows, 1, 1)

    def gather(row, col):
        return flat.take(row + col).float()

    if taps_y == 1 and taps_x == 1 and (boxes[:, 2:] == size).all() and (boxes[:, :2] == np.floor(boxes[:, :2])).all():
        return gather(row0, col0).permute(0, 3, 1, 2)  # whole-pixel windows: a copy, one gather
    upper = gather(row0, col0)
    upper += (gather(row0, col1) - upper) * wx
    lower = gather(row1, col0)
    lower += (gather(row1, col1) - lower) * wx
    upper += (lower - upper) * wy
    if taps_y > 1 or taps_x > 1:
        upper = upper.view(count, size, taps_y, size, taps_x, 3).mean(dim=(2, 4))
    return upper.permute(0, 3, 1, 2)


_SCALED = {}  # device -> (255 * MEAN, 255 * STD) on it, made once (no copy per batch)


def _normalize_(batch: torch.Tensor) -> torch.Tensor:
    """In place: float 0..255 -> ImageNet-normalised (as ``normalize``)."""
    if batch.device not in _SCALED:
        _SCALED[batch.device] = ((MEAN * 255).to(batch.device), (STD * 255).to(batch.device))
    mean, std = _SCALED[batch.device]
    return batch.sub_(mean).div_(std)


def default_workers(device: torch.device) -> int:
    """Decode threads (or DataLoader processes) when the setting is 0. GPU: all cores but two (those
    run the training and producer threads). CPU: a quarter of torch's threads, at least one (decoding
    stored shards costs a fraction of a CPU training step; see ``decodes_while_training``)."""
    if device.type == "cuda":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores - 2)
    return max(1, round(torch.get_num_threads() / 4))


def _one_thread() -> None:
    """Decode thread initializer: torch ops in this thread (resize, flip, copy) run on it alone.
    Otherwise each decode thread would start an OpenMP team of torch's size (16 threads x 14
    decoders on a GPU node)."""
    torch.get_num_threads()  # settle this thread's own count first, so that the next line sticks
    torch.set_num_threads(1)


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    step = max(1, math.ceil(count / max(1, parts)))
    return [(start, min(count, start + step)) for start in range(0, count, step)]


# ---------------------------------------------------------------------------------------------
# The fast loader
# ---------------------------------------------------------------------------------------------

class FastLoader:
    """Batches of ``images`` at ``resolution`` px: random crops and flips (``train``) or center crops.

    ``epoch(generator)`` yields (images, labels) on ``device``: images float Nx3xRxR,
    ImageNet-normalised (channels_last memory when ``channels_last``), labels int64."""

    def __init__(self, images: ImageRows, resolution: int, batch_size: int, device: torch.device, *,
                 augment: str = "crop", train: bool = True, workers: int = 0, prefetch: int = 4,
                 cache_gib: float = 2.0, cpu_decode_share: float = 0.5, channels_last: bool = False,
                 log: Callable[[str], None] = print):
        if augment not in AUGMENTATIONS:
            raise UserError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
        self.images, self.resolution, self.batch_size = images, resolution, batch_size
        self.device, self.augment, self.train = torch.device(device), augment, train
        self.workers = workers or default_workers(self.device)
        self.prefetch = max(1, prefetch)
        self.cpu_decode_share = min(1.0, max(0.0, cpu_decode_share))
        self.channels_last = channels_last
        self.log = log
        self.side = short_side_for(resolution)
        self.heights, self.widths = images.sizes()
        self.reader = ShardBytes(images.data)
        self._pool: ThreadPoolExecutor | None = None
        self._gpu_decode = True  # nvJPEG works (until it fails once)
        self._producer = False  # tests: run the GPU path's producer on a CPU
        self.cache: torch.Tensor | None = None
        cache_bytes = len(images) * 3 * self.side * self.side
        if len(images) and cache_bytes <= cache_gib * 2**30:
            self.cache = self._fill_cache().to(self.device)

    # -- set-up and teardown
    @property
    def pool(self) -> ThreadPoolExecutor:
        """The decode threads, all started now, each running torch ops on itself alone."""
        if self._pool is None:
            before = torch.get_num_threads()
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="itl-decode", initializer=_one_thread)
            started = threading.Barrier(self.workers)
            for future in [self._pool.submit(started.wait) for _ in range(self.workers)]:
                future.result()
            torch.set_num_threads(before)  # the count threads started later begin with is process-wide
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def decodes_while_training(self) -> bool:
        """True when the decode threads compete with a CPU training step for cores. Training should
        then leave them theirs: torch's OpenMP threads spin at their barriers, and on a busy machine
        a step whose threads share cores with decoders was measured up to 10x slower."""
        return self.cache is None and self.device.type == "cpu"

    def describe(self) -> str:
        where = f"{self.workers} decode thread{'s' if self.workers > 1 else ''}"
        if self.cache is not None:
            source = f"decoded once, {self.cache.numel() / 2**20:.0f} MiB cached on {self.device.type}"
        elif self.device.type == "cuda":
            source = f"decoded every epoch: {self.cpu_decode_share:.0%} by {where}, the rest by nvJPEG on the GPU"
        else:
            source = f"decoded every epoch by {where}"
        return f"fast pipeline ({len(self.images)} images, {source})"

    def _fill_cache(self) -> torch.Tensor:
        count, rows, folder = len(self.images), self.images.rows, self.images.data.folder
        out = torch.empty((count, 3, self.side, self.side), dtype=torch.uint8)
        parts = _split(count, self.workers * 4) if count >= 256 and self.workers > 1 else [(0, count)]
        if len(parts) == 1:
            _decode_squares(self.reader.views(rows), rows, folder, self.side, out)
            return out
        futures = [self.pool.submit(_decode_squares, self.reader.views(rows[a:b]), rows[a:b], folder, self.side,
                                    out[a:b]) for a, b in parts]
        for future in futures:
            future.result()
        return out

    # -- one epoch
    def epoch(self, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = len(self.images)
        if self.cache is not None:
            heights = widths = np.full(count, self.side, dtype=np.int64)
        else:
            heights, widths = self.heights, self.widths
        if self.train:
            if generator is None:
                raise ValueError("a training epoch needs the generator its crops are drawn from")
            order, numbers, flips = draw_epoch(count, self.augment, self.resolution, self.batch_size, generator)
            plans = train_plan(self.augment, numbers, heights[order], widths[order], self.resolution)
        else:
            order = np.arange(count)
            plans = center_plan(heights, widths, self.resolution)
            flips = np.zeros(count, dtype=bool)
        batches = [(start, min(count, start + self.batch_size)) for start in range(0, count, self.batch_size)]
        if self.cache is not None:
            return self._cached(order, plans, flips, batches)
        if self.device.type == "cuda" or self._producer:
            return self._gpu(order, plans, flips, batches)
        return self._threads(order, plans, flips, batches)

    def _labels(self, positions: np.ndarray) -> torch.Tensor:
        return _to_device(self.images.labels[positions], self.device)

    def _finish(self, batch: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return batch.contiguous(memory_format=torch.channels_last)
        return batch.contiguous()

    def _cached(self, order, plans, flips, batches):
        size, side = self.resolution, self.side
        for start, stop in batches:
            positions = order[start:stop]
            if self.device.type == "cuda":  # one gather from the squares on the GPU
                squares = np.full(len(positions), side)
                boxes = source_boxes(plans[start:stop], squares, squares)
                batch = resample(self.cache.view(-1), positions * (3 * side * side), squares, squares, boxes,
                                 flips[start:stop], size)
                yield self._finish(_normalize_(batch)), self._labels(positions)
                continue
            out = torch.empty((len(positions), 3, size, size), dtype=torch.uint8)
            for index, position in enumerate(positions):
                out[index] = crop_image(self.cache[position], plans[start + index], bool(flips[start + index]), size)
            yield self._finish(normalize(out)), self._labels(positions)

    def _submit_crops(self, positions, plans, flips, out) -> list:
        """Queue decode + crop of ``positions`` into ``out`` on the threads; returns the futures."""
        rows = self.images.rows[positions]
        views = self.reader.views(rows)
        heights, widths = self.heights[positions], self.widths[positions]
        return [self.pool.submit(_decode_crops, views[a:b], rows[a:b], self.images.data.folder, heights[a:b],
                                 widths[a:b], plans[a:b], flips[a:b], self.resolution, out[a:b])
                for a, b in _split(len(positions), self.workers)]

    def _threads(self, order, plans, flips, batches):
        """CPU: threads decode ``prefetch`` batches ahead of the one being trained on."""
        size = self.resolution
        pending: deque = deque()

        def submit(index):
            start, stop = batches[index]
            out = torch.empty((stop - start, 3, size, size), dtype=torch.uint8)
            return out, self._submit_crops(order[start:stop], plans[start:stop], flips[start:stop], out), start, stop

        try:
            for index in range(min(self.prefetch, len(batches))):
                pending.append(submit(index))
            for index in range(len(batches)):
                out, futures, start, stop = pending.popleft()
                if index + self.prefetch < len(batches):
                    pending.append(submit(index + self.prefetch))
                for future in futures:
                    future.result()
                yield self._finish(normalize(out)), self._labels(order[start:stop])
        finally:
            for _, futures, _, _ in pending:
                for future in futures:
                    future.cancel()

    # -- GPU: producer thread on its own stream
    def _gpu(self, order, plans, flips, batches):
        handoff: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(order, plans, flips, batches, handoff, stop),
                                    name="itl-gpu-batches", daemon=True)
        producer.start()
        try:
            for _ in batches:
                item = handoff.get()
                if isinstance(item, BaseException):
                    raise item
                images, labels, ready = item
                if ready is not None:  # the training stream waits for the data stream's batch
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(ready)
                    images.record_stream(stream)  # allocated on the data stream, used on this one
                    labels.record_stream(stream)
                yield images, labels
        finally:
            stop.set()
            while producer.is_alive():
                try:
                    handoff.get(timeout=0.05)
                except queue.Empty:
                    pass
            producer.join()

    def _produce(self, order, plans, flips, batches, handoff: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    handoff.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            if self.device.type != "cuda":  # tests run this path on a CPU, without streams
                self._produce_on(None, order, plans, flips, batches, put, stop)
                return
            with torch.cuda.device(self.device):
                stream = torch.cuda.Stream(self.device)
                with torch.cuda.stream(stream):
                    self._produce_on(stream, order, plans, flips, batches, put, stop)
        except BaseException as error:  # handed to the training thread, which raises it
            put(error)

    def _produce_on(self, stream, order, plans, flips, batches, put, stop) -> None:
        """Make the epoch's batches on ``stream`` (current in this thread): the CPU share of batch n
        + ``prefetch`` is queued on the decode threads while the GPU decodes batch n."""
        size, device = self.resolution, self.device
        shares = [round((end - start) * self.cpu_decode_share) for start, end in batches]
        capacity = max(shares) if shares else 0
        ring = self.prefetch + 2
        # NHWC host buffers for the CPU share, viewed as NCHW (channels_last), pinned, used in turn.
        pinned = [_pinned(torch.empty((capacity, size, size, 3), dtype=torch.uint8), device).permute(0, 3, 1, 2)
                  for _ in range(ring if capacity else 0)]
        copied: list = [None] * len(pinned)  # per buffer: the event after its last copy to the GPU
        pending: dict[int, list] = {}

        def submit(index):
            slot = index % ring
            if copied[slot] is not None:
                copied[slot].synchronize()  # the batch that used this buffer before has left it
            start, share = batches[index][0], shares[index]
            pending[index] = self._submit_crops(order[start : start + share], plans[start : start + share],
                                                flips[start : start + share], pinned[slot][:share])

        lookahead = self.prefetch
        try:
            for index in range(min(lookahead, len(batches))):
                if shares[index]:
                    submit(index)
            for index, (start, end) in enumerate(batches):
                if stop.is_set():
                    return
                if index + lookahead < len(batches) and shares[index + lookahead]:
                    submit(index + lookahead)
                share, count = shares[index], end - start
                batch = torch.empty((count, 3, size, size), dtype=torch.float32, device=device,
                                    memory_format=torch.channels_last)
                if share < count:
                    self._decode_on_gpu(order[start + share : end], plans[start + share : end],
                                        flips[start + share : end], batch[share:])
                if share:
                    for future in pending.pop(index):
                        future.result()
                    slot = index % ring
                    batch[:share].copy_(pinned[slot][:share].to(device, non_blocking=True))
                    copied[slot] = _recorded(stream)
                _normalize_(batch)
                if not self.channels_last:
                    batch = batch.contiguous()
                if not put((batch, self._labels(order[start:end]), _recorded(stream))):
                    return
        finally:
            for futures in pending.values():
                for future in futures:
                    future.cancel()

    def _decode_on_gpu(self, positions, plans, flips, out) -> None:
        views = self.reader.views(self.images.rows[positions])
        heights, widths = self.heights[positions], self.widths[positions]
        decoded = None
        if self._gpu_decode:
            try:
                decoded = decode_jpeg(views, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError as error:
                # A corrupt image fails on the CPU too (and raises there); otherwise nvJPEG is unusable.
                self._check_on_cpu(views, positions)
                self._gpu_decode = False
                self.log(f"loader: nvJPEG decode failed ({str(error).splitlines()[0][:120]}); decoding on the CPU")
        if decoded is None:  # decode on the CPU threads, crop there, copy over
            host = torch.empty((len(positions), 3, self.resolution, self.resolution), dtype=torch.uint8)
            for future in self._submit_crops(positions, plans, flips, host):
                future.result()
            out.copy_(_pinned(host, self.device).to(self.device, non_blocking=True))
            return
        rows = self.images.rows[positions]
        for index, image in enumerate(decoded):
            _check_size(image, heights[index], widths[index], _name(rows, index, self.images.data.folder))
        flat = torch.cat([image.reshape(-1) for image in decoded])
        sizes = 3 * heights * widths
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        resample(flat, starts, heights, widths, source_boxes(plans, heights, widths), flips, self.resolution, out=out)

    def _check_on_cpu(self, views, positions) -> None:
        rows = self.images.rows[positions]
        for index, data in enumerate(views):
            try:
                decode_jpeg(data, mode=ImageReadMode.RGB)
            except RuntimeError as error:
                raise UserError(f"cannot decode image {_name(rows, index, self.images.data.folder)} ({error}); "
                                "prepare its dataset again") from None


# ---------------------------------------------------------------------------------------------
# The plain torchvision pipeline (for comparison)
# ---------------------------------------------------------------------------------------------

class ShardRowsDataset(torch.utils.data.Dataset):
    """Shard rows decoded with PIL and transformed with torchvision.transforms, one image per item.

    An item key is (position, *plan row, flip): resize to the plan's size, cut its window, resize
    that to the resolution, flip (see PLAN_COLUMNS)."""

    def __init__(self, folder: str, kind: str, rows: np.ndarray, resolution: int):
        self.folder, self.kind, self.rows, self.resolution = folder, kind, rows, resolution
        self._data: Prepared | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import functional as TF

        position, resized_h, resized_w, top, left, height, width, flip = key
        if self._data is None:  # opened in the worker process that uses it
            self._data = Prepared(self.folder, self.kind)
        (data,) = self._data.read([self.rows[position]])
        image = Image.open(io.BytesIO(data)).convert("RGB")
        size = self.resolution
        if image.size != (resized_w, resized_h):
            image = TF.resize(image, [resized_h, resized_w])
        image = TF.crop(image, top, left, height, width)
        if (height, width) != (size, size):
            image = TF.resize(image, [size, size])
        if flip:
            image = TF.hflip(image)
        return TF.normalize(TF.to_tensor(image), MEAN.flatten().tolist(), STD.flatten().tolist())


class _EpochBatches:
    """The DataLoader's batch sampler: the current epoch's batches of item keys."""

    def __init__(self):
        self.batches: list[list[tuple]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchvisionLoader:
    """The same batches as ``FastLoader`` (same plan), made the plain way: PIL + torchvision
    transforms in DataLoader worker processes (``workers``; 0 decodes in this process)."""

    def __init__(self, images: ImageRows, resolution: int, batch_size: int, device: torch.device, *,
                 augment: str = "crop", train: bool = True, workers: int = 0, prefetch: int = 2,
                 channels_last: bool = False, log: Callable[[str], None] = print):
        if augment not in AUGMENTATIONS:
            raise UserError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {augment!r}")
        self.images, self.resolution, self.batch_size = images, resolution, batch_size
        self.device, self.augment, self.train = torch.device(device), augment, train
        self.channels_last = channels_last
        self.heights, self.widths = images.sizes()
        self.sampler = _EpochBatches()
        dataset = ShardRowsDataset(str(images.data.folder), images.data.info["kind"], images.rows, resolution)
        self.workers = workers
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=max(1, prefetch) if workers > 0 else None,
            generator=torch.Generator().manual_seed(0),  # keeps the global generator (dropout) untouched
        )

    @property
    def decodes_while_training(self) -> bool:
        return self.workers > 0 and self.device.type == "cpu"

    def describe(self) -> str:
        return f"torchvision pipeline ({len(self.images)} images, PIL + transforms, {self.workers} DataLoader workers)"

    def close(self) -> None:
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def epoch(self, generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        count = len(self.images)
        if self.train:
            if generator is None:
                raise ValueError("a training epoch needs the generator its crops are drawn from")
            order, numbers, flips = draw_epoch(count, self.augment, self.resolution, self.batch_size, generator)
            plans = train_plan(self.augment, numbers, self.heights[order], self.widths[order], self.resolution)
        else:
            order = np.arange(count)
            plans = center_plan(self.heights, self.widths, self.resolution)
            flips = np.zeros(count, dtype=bool)
        keys = [(int(position), *(int(value) for value in plan), bool(flip))
                for position, plan, flip in zip(order, plans, flips)]
        self.sampler.batches = [keys[start : start + self.batch_size] for start in range(0, count, self.batch_size)]
        return self._batches(order)

    def _batches(self, order):
        start = 0
        for images in self.loader:
            stop = start + len(images)
            labels = torch.from_numpy(self.images.labels[order[start:stop]])
            start = stop
            if self.device.type == "cuda":
                images = images.to(self.device, non_blocking=True)
                labels = labels.pin_memory().to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, labels
