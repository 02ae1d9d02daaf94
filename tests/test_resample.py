"""Batched resampling (the fast loader's GPU gather), run on the CPU: crops, resizes and flips a
batch of differently sized images as its definition says, and copies exact windows exactly."""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.ops import roi_align

from itl_ray import resample


def reference_resample(image, box, flip, size):
    """``resample``'s definition, one output pixel at a time (float64)."""
    top, left, height, width = box
    taps_y = int(np.clip(math.ceil(height / size - 0.5), 1, resample.MAX_TAPS))
    taps_x = int(np.clip(math.ceil(width / size - 0.5), 1, resample.MAX_TAPS))
    pixels = image.double().numpy()
    rows, cols = pixels.shape[1:]

    def sample(y, x):
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = min(int(y), rows - 1), min(int(x), cols - 1)
        y1, x1 = min(y0 + 1, rows - 1), min(x0 + 1, cols - 1)
        wy, wx = min(y - y0, 1.0), min(x - x0, 1.0)
        return ((1 - wy) * ((1 - wx) * pixels[:, y0, x0] + wx * pixels[:, y0, x1])
                + wy * ((1 - wx) * pixels[:, y1, x0] + wx * pixels[:, y1, x1]))

    out = np.zeros((3, size, size))
    for oy in range(size):
        for ox in range(size):
            out[:, oy, ox] = np.mean([sample(top + (oy + (j + 0.5) / taps_y) * height / size - 0.5,
                                             left + (ox + (i + 0.5) / taps_x) * width / size - 0.5)
                                      for j in range(taps_y) for i in range(taps_x)], axis=0)
    return torch.from_numpy(out[:, :, ::-1].copy() if flip else out)


def test_resample_crops_resizes_and_flips_a_batch_of_different_sizes():
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((50, 70), (64, 64), (90, 40), (73, 97))]
    flat = torch.cat([image.reshape(-1) for image in images])
    heights = np.array([image.shape[1] for image in images])
    widths = np.array([image.shape[2] for image in images])
    starts = np.concatenate([[0], np.cumsum(3 * heights * widths)[:-1]])
    boxes = np.array([[3.5, 5, 40, 60], [0, 0, 64, 64], [10, 2.25, 80, 38], [0, 10, 73, 73]])
    flips = np.array([False, True, False, True])
    out = resample.resample(flat, starts, heights, widths, boxes, flips, 24)
    assert out.shape == (4, 3, 24, 24) and out.is_contiguous(memory_format=torch.channels_last)
    for index, image in enumerate(images):
        expected = reference_resample(image, boxes[index], flips[index], 24)
        assert (out[index].double() - expected).abs().max().item() < 1e-3
    # Equal sampling counts per axis: torchvision's roi_align (aligned) computes the same.
    top, left, height, width = boxes[1]
    region = torch.tensor([[left, top, left + width, top + height]], dtype=torch.float32)
    aligned = roi_align(images[1][None].float(), [region], output_size=24, sampling_ratio=3, aligned=True)[0].flip(-1)
    assert (out[1] - aligned).abs().max().item() < 1e-3


def test_resample_copies_exact_windows_exactly_in_small_chunks(monkeypatch):
    monkeypatch.setattr(resample, "CHUNK_ELEMENTS", 3 * 32 * 32 * 2)  # two images per gather
    images = torch.randint(0, 256, (5, 3, 40, 50), dtype=torch.uint8)
    boxes = np.array([[i, 2 * i, 32, 32] for i in range(5)], dtype=np.float64)
    flips = np.array([True, False, True, False, True])
    out = resample.resample(images.reshape(-1), np.arange(5) * 3 * 40 * 50, np.full(5, 40), np.full(5, 50), boxes,
                          flips, 32)
    for i in range(5):
        window = images[i, :, i : i + 32, 2 * i : 2 * i + 32].float()
        assert torch.equal(out[i], window.flip(-1) if flips[i] else window)


