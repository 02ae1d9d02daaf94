"""Batched resampling on the device: crop, resize and flip a batch of differently sized images in a
few gathers, so that a GPU cuts a whole batch at once (the fast loader's GPU path) instead of one
image per CPU thread.
"""

from __future__ import annotations

import numpy as np
import torch

MAX_TAPS = 4  # samples per axis and output pixel when ``resample`` shrinks a box
CHUNK_ELEMENTS = 1 << 24  # ``resample`` gathers at most this many values at once (bounds GPU memory)


def resample(flat: torch.Tensor, starts: np.ndarray, heights: np.ndarray, widths: np.ndarray, boxes: np.ndarray,
             flips: np.ndarray, size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Crop, resize and flip a batch of differently sized images in a few gathers (on any device).

    ``flat`` holds the uint8 images one after another, each 3xHxW (CHW order) from ``starts``
    (element offsets), of ``heights`` x ``widths`` px; ``boxes`` are float Nx4 (top, left, height,
    width) in each image's pixels (``crop_plans.source_boxes``); ``flips`` N bools; ``size`` the
    output side S in px. Returns float Nx3xSxS in 0..255, channels_last in memory (``out`` when
    given), on ``flat``'s device. Bilinear sampling at pixel centres, as
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
                out.index_copy_(0, to_device(chosen, device), values)
    return out


def pinned_for(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` in pinned memory when it is bound for a GPU (so its copy can be non-blocking)."""
    return tensor.pin_memory() if device.type == "cuda" else tensor


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device``: pinned, then copied without blocking this thread."""
    return pinned_for(torch.from_numpy(np.ascontiguousarray(array)), device).to(device, non_blocking=True)


def _resample_group(flat, starts, heights, widths, boxes, flips, size, taps_y, taps_x) -> torch.Tensor:
    """``resample`` for images sharing their sampling counts: float N x 3 x size x size (channels_last)."""
    device = flat.device
    count = len(boxes)
    ints = to_device(np.stack([starts, heights, widths], axis=1).astype(np.int64), device)
    floats = to_device(np.concatenate([boxes[:, :2], boxes[:, 2:] / size, flips[:, None]], axis=1)
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


