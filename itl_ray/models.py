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
    """Channels at this width, a multiple of 8 (grouped convolutions need an even count)."""
    return max(8, int(round(channels * width / 8)) * 8)


def _pool_out(size: int) -> int:
    """Caffe max pooling 3x3 stride 2 rounds the output size up."""
    return math.ceil((size - 3) / 2) + 1


def pool5_grid(resolution: int) -> int:
    """Side of the pool5 feature grid for square inputs of this resolution (6 at 227)."""
    conv1 = (resolution - 11) // 4 + 1
    if conv1 < 3:
        raise ValueError(f"resolution {resolution} is too small for AlexNet (at least 19 px)")
    return _pool_out(_pool_out(_pool_out(conv1)))


class AlexNet(nn.Module):
    """AlexNet with a replaceable last layer.

    ``features`` maps an image to conv5 (stride 16, before pool5): the detector pools regions
    from it. ``embed`` maps pool5 to fc7 (the penultimate features); ``fc8`` classifies.
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
        """fc7 features of a batch of images at this network's resolution."""
        return self.embed(self.pool5(self.features(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.penultimate(images))

    def replace_classifier(self, num_classes: int) -> None:
        """A fresh fc8 for a new task (fine-tuning keeps conv1..fc7)."""
        self.fc8 = nn.Linear(self.embed_dim, num_classes)
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)
