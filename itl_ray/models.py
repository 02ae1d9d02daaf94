"""AlexNet as the study trained it, and the heads the transfer tasks put on it.

The study used Caffe's reference AlexNet (Krizhevsky et al. 2012): five convolutions (conv2, conv4
and conv5 split into two groups), local response normalisation after conv1 and conv2, max pooling
with Caffe's round-up output size, then fc6 and fc7 (4096 units, dropout) and fc8.

``width`` scales every layer's channel count (1.0 is the study's network); the input resolution is
free (227 in the study): the pool5 grid follows from it (6x6 at 227, 1x1 at 64), and fc6 is sized to
match. A small width and resolution let the mini-benchmark run on a CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The study's channel counts: conv1..conv5, then fc6/fc7.
CONV_CHANNELS = (96, 256, 384, 384, 256)
FC_UNITS = 4096


def scaled(channels: int, width: float) -> int:
    """Channels at this width: ``channels * width`` rounded to a multiple of 8, at least 8
    (grouped convolutions need an even count; multiples of 8 suit tensor cores).
    ``scaled(96, 1.0) == 96``, ``scaled(96, 0.25) == 24``."""
    return max(8, int(round(channels * width / 8)) * 8)


def _pool_out(size: int) -> int:
    """Output side of Caffe's 3x3 stride-2 max pooling, which rounds up (Caffe's pooling_layer.cpp
    uses ceil); torch matches with ``ceil_mode=True``."""
    return math.ceil((size - 3) / 2) + 1


MIN_RESOLUTION = 39  # px: the smallest input whose pool5 grid has a cell (see pool5_grid)


def pool5_grid(resolution: int) -> int:
    """Side of the pool5 feature grid, in cells, for square inputs of ``resolution`` px: conv1
    (11x11, stride 4, no padding) then three 3x3 stride-2 poolings (the convolutions between keep
    the size). 6 at 227 (the study's 6x6x256 pool5), 1 from 39 to 70 px (the demo's 64). Raises
    ValueError below ``MIN_RESOLUTION`` (39 px), where pool5 would have no cell."""
    grid = _pool_out(_pool_out(_pool_out((resolution - 11) // 4 + 1)))
    if grid < 1:
        raise ValueError(f"resolution {resolution} is too small for AlexNet (at least {MIN_RESOLUTION} px)")
    return grid


class AlexNet(nn.Module):
    """AlexNet with a replaceable last layer, in the layout of Caffe's models/bvlc_alexnet/
    train_val.prototxt (conv1 96x11x11 stride 4, LRN, pool; conv2 256x5x5 group 2, LRN, pool;
    conv3 384x3x3; conv4 384x3x3 group 2; conv5 256x3x3 group 2, pool; fc6 and fc7 4096 with
    dropout 0.5; fc8), every channel count scaled by ``width``.

    Input: float images, shape (N, 3, resolution, resolution), normalised with the ImageNet mean
    and std. ``features`` maps them to conv5, (N, conv5_channels, H, W) at stride 16 before pool5
    (the detector pools regions from it); ``pool5`` gives (N, conv5_channels, grid, grid);
    ``embed`` flattens that to fc7, (N, embed_dim); ``fc8`` gives logits (N, num_classes).
    Args: ``num_classes`` of fc8; ``width``, the channel multiplier (1.0: the study's network,
    about 61 M parameters at 227 px with 1000 classes); ``resolution`` in px, which sizes fc6 to
    the pool5 grid (ValueError below 39 px); ``dropout`` before fc6 and fc7.
    """

    def __init__(self, num_classes: int, width: float = 1.0, resolution: int = 227, dropout: float = 0.5):
        super().__init__()
        c1, c2, c3, c4, c5 = (scaled(c, width) for c in CONV_CHANNELS)
        fc = scaled(FC_UNITS, width)
        self.width = width
        self.resolution = resolution
        self.grid = pool5_grid(resolution)
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=11, stride=4),
            nn.ReLU(inplace=True),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2, groups=2),
            nn.ReLU(inplace=True),
            nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1, groups=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1, groups=2),
            nn.ReLU(inplace=True),
        )
        self.pool5 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv5_channels = c5
        self.embed = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c5 * self.grid * self.grid, fc),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc, fc),
            nn.ReLU(inplace=True),
        )
        self.embed_dim = fc
        self.fc8 = nn.Linear(fc, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # Caffe's recipe (Gaussian weights of std 0.01) stalls for epochs at the start; Kaiming
        # initialisation (ReLU gain) of every layer before fc8 trains from the first step.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    def penultimate(self, images: torch.Tensor) -> torch.Tensor:
        """fc7 features (after ReLU), shape (N, embed_dim), of images (N, 3, resolution,
        resolution); another input size fails in fc6 (its input size follows the pool5 grid)."""
        return self.embed(self.pool5(self.features(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits, shape (N, num_classes), of images (N, 3, resolution, resolution)."""
        return self.fc8(self.penultimate(images))

    def replace_classifier(self, num_classes: int) -> None:
        """A fresh fc8 with ``num_classes`` outputs (weights N(0, 0.01), bias 0, as ``__init__``)
        for a new task: fine-tuning keeps conv1..fc7. The new layer is on the CPU in float32;
        move the model to its device afterwards."""
        self.fc8 = nn.Linear(self.embed_dim, num_classes)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)
