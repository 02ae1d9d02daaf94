"""AlexNet as Caffe trained it for the study, and the heads the transfer tasks put on it.

The study trained AlexNet (Krizhevsky et al. 2012) with Caffe. Caffe ships it twice (BVLC/caffe,
``models/<variant>/train_val.prototxt``), and ``variant`` picks one:

- ``bvlc_reference_caffenet`` (the default): conv1 -> relu1 -> pool1 -> norm1, conv2 -> relu2 ->
  pool2 -> norm2, i.e. local response normalisation *after* pooling; biases of conv2, conv4,
  conv5, fc6 and fc7 start at 1.
- ``bvlc_alexnet``: conv1 -> relu1 -> norm1 -> pool1 and likewise for conv2 (the order of the 2012
  paper); those biases start at 0.1.

Everything else is common to both prototxts (each layer block quoted by its name and fields):
  conv1 ``num_output: 96 kernel_size: 11 stride: 4``; conv2 ``num_output: 256 pad: 2
  kernel_size: 5 group: 2``; conv3 ``num_output: 384 pad: 1 kernel_size: 3``; conv4
  ``num_output: 384 pad: 1 kernel_size: 3 group: 2``; conv5 ``num_output: 256 pad: 1
  kernel_size: 3 group: 2``; pool1/pool2/pool5 ``pool: MAX kernel_size: 3 stride: 2`` (Caffe
  rounds the pooled size up: ``ceil_mode=True``); norm1/norm2 ``local_size: 5 alpha: 0.0001
  beta: 0.75`` (Caffe's LRN divides alpha by local_size and adds k = 1, as
  ``nn.LocalResponseNorm``); fc6/fc7 ``num_output: 4096``, each followed by its ReLU and
  ``drop6``/``drop7`` ``dropout_ratio: 0.5``; fc8 ``num_output: 1000`` reads drop7.
  Fillers: ``weight_filler { type: "gaussian" std: 0.01 }`` for conv1..conv5 and fc8,
  ``std: 0.005`` for fc6 and fc7; ``bias_filler { type: "constant" value: ... }`` as above (conv1,
  conv3, fc8: 0). Every layer has ``param { lr_mult: 1 decay_mult: 1 }`` for its weights and
  ``param { lr_mult: 2 decay_mult: 0 }`` for its bias: biases learn at twice the rate and are not
  decayed (``parameter_groups``).

Why CaffeNet is the default (an **assumption**: the study says "AlexNet" and Caffe, not which
prototxt): it is "Caffe's reference model", the network of the Berkeley work the study builds on
(R-CNN; Fast R-CNN's model "S", which the detection transfer follows, is CaffeNet), and its
solver (``bvlc_reference_caffenet/solver.prototxt``) is the schedule ``pretrain.py`` follows.
Both have the same parameters: 60,965,224 at full width with 1000 classes.

``width`` scales every layer's channel count (1.0 is the study's network); the input resolution is
free (227 in the study): the pool5 grid follows from it (6x6 at 227, 1x1 at 64), and fc6 is sized to
match. A small width and resolution let the mini-benchmark run on a CPU. ``init`` chooses Caffe's
Gaussians (``caffe``, the study's) or He initialisation (``kaiming``): Caffe's fixed standard
deviations are sized for the full network; a narrow one starts with much smaller activations and
can sit on its initial loss for many iterations (see ``sweeps/smoke.yaml``).
"""

from __future__ import annotations

import math
import typing
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

# The study's channel counts: conv1..conv5, then fc6/fc7.
CONV_CHANNELS = (96, 256, 384, 384, 256)
FC_UNITS = 4096
Variant = Literal["bvlc_reference_caffenet", "bvlc_alexnet"]  # the Caffe prototxts, as a setting declares them
VARIANTS = typing.get_args(Variant)
Init = Literal["caffe", "kaiming"]  # the initialisations, as a setting declares them
INITS = typing.get_args(Init)
DROPOUT = 0.5  # drop6/drop7 dropout_ratio in both prototxts

# Caffe's fillers per layer: (weight_filler gaussian std, bias_filler constant), from each
# variant's train_val.prototxt (see the module docstring).
CAFFE_FILLERS = {
    "bvlc_reference_caffenet": {"conv1": (0.01, 0.0), "conv2": (0.01, 1.0), "conv3": (0.01, 0.0),
                                "conv4": (0.01, 1.0), "conv5": (0.01, 1.0), "fc6": (0.005, 1.0),
                                "fc7": (0.005, 1.0), "fc8": (0.01, 0.0)},
    "bvlc_alexnet": {"conv1": (0.01, 0.0), "conv2": (0.01, 0.1), "conv3": (0.01, 0.0),
                     "conv4": (0.01, 0.1), "conv5": (0.01, 0.1), "fc6": (0.005, 0.1),
                     "fc7": (0.005, 0.1), "fc8": (0.01, 0.0)},
}
# Every layer's ``param`` blocks: weights lr_mult 1 decay_mult 1, biases lr_mult 2 decay_mult 0.
WEIGHT_MULTIPLIERS = {"lr_mult": 1.0, "decay_mult": 1.0}
BIAS_MULTIPLIERS = {"lr_mult": 2.0, "decay_mult": 0.0}


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


def _lrn() -> nn.LocalResponseNorm:
    return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(3, 2, ceil_mode=True)


class AlexNet(nn.Module):
    """AlexNet in the layout of Caffe's ``variant`` prototxt (module docstring), every channel count
    scaled by ``width``, with a replaceable fc8.

    Input: float images, shape (N, 3, resolution, resolution), normalised with the ImageNet mean
    and std. ``features`` maps them to conv5 after relu5, (N, conv5_channels, H, W) at stride 16
    before pool5 (the detector pools regions from it); ``pool5`` gives (N, conv5_channels, grid,
    grid); ``embed`` flattens that and runs fc6, relu6, drop6, fc7, relu7, drop7, (N, embed_dim),
    what fc8 reads in training; ``penultimate`` is fc7 after relu7 and before drop7; ``fc8`` gives
    logits (N, num_classes). Layers are named as in the prototxt (``features.conv1``,
    ``embed.fc6``, ...).

    Args: ``num_classes`` of fc8; ``width``, the channel multiplier (1.0: the study's network,
    60,965,224 parameters at 227 px with 1000 classes); ``resolution`` in px, which sizes fc6 to
    the pool5 grid (ValueError below 39 px); ``variant`` and ``init`` (``VARIANTS``, ``INITS``;
    ValueError for another); ``dropout``, drop6's and drop7's ratio. Initialisation draws from
    torch's global generator (seed it first for a reproducible network)."""

    def __init__(self, num_classes: int, width: float = 1.0, resolution: int = 227,
                 variant: str = "bvlc_reference_caffenet", init: str = "caffe", dropout: float = DROPOUT):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"AlexNet variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if init not in INITS:
            raise ValueError(f"AlexNet init must be one of {', '.join(INITS)}, got {init!r}")
        c1, c2, c3, c4, c5 = (scaled(c, width) for c in CONV_CHANNELS)
        fc = scaled(FC_UNITS, width)
        self.width, self.resolution, self.variant, self.init = width, resolution, variant, init
        self.grid = pool5_grid(resolution)
        if variant == "bvlc_reference_caffenet":  # pool, then normalise
            block1 = [("pool1", _pool()), ("norm1", _lrn())]
            block2 = [("pool2", _pool()), ("norm2", _lrn())]
        else:  # normalise, then pool
            block1 = [("norm1", _lrn()), ("pool1", _pool())]
            block2 = [("norm2", _lrn()), ("pool2", _pool())]
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, c1, kernel_size=11, stride=4)),
            ("relu1", nn.ReLU(inplace=True)),
            *block1,
            ("conv2", nn.Conv2d(c1, c2, kernel_size=5, padding=2, groups=2)),
            ("relu2", nn.ReLU(inplace=True)),
            *block2,
            ("conv3", nn.Conv2d(c2, c3, kernel_size=3, padding=1)),
            ("relu3", nn.ReLU(inplace=True)),
            ("conv4", nn.Conv2d(c3, c4, kernel_size=3, padding=1, groups=2)),
            ("relu4", nn.ReLU(inplace=True)),
            ("conv5", nn.Conv2d(c4, c5, kernel_size=3, padding=1, groups=2)),
            ("relu5", nn.ReLU(inplace=True)),
        ]))
        self.pool5 = _pool()
        self.conv5_channels = c5
        self.embed = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc6", nn.Linear(c5 * self.grid * self.grid, fc)),
            ("relu6", nn.ReLU(inplace=True)),
            ("drop6", nn.Dropout(dropout)),
            ("fc7", nn.Linear(fc, fc)),
            ("relu7", nn.ReLU(inplace=True)),
            ("drop7", nn.Dropout(dropout)),
        ]))
        self.embed_dim = fc
        self.fc8 = nn.Linear(fc, num_classes)
        self._init_weights()

    def layers(self) -> dict[str, nn.Module]:
        """The learnt layers by their prototxt names: conv1..conv5, fc6, fc7, fc8."""
        named = {name: module for name, module in self.features.named_children() if name.startswith("conv")}
        return {**named, "fc6": self.embed.fc6, "fc7": self.embed.fc7, "fc8": self.fc8}

    def _init_weights(self) -> None:
        if self.init == "caffe":
            fillers = CAFFE_FILLERS[self.variant]
            for name, layer in self.layers().items():
                std, bias = fillers[name]
                nn.init.normal_(layer.weight, std=std)
                nn.init.constant_(layer.bias, bias)
            return
        # He initialisation (ReLU gain, zero biases) of every layer before fc8; fc8 as Caffe's.
        for name, layer in self.layers().items():
            if name == "fc8":
                nn.init.normal_(layer.weight, std=CAFFE_FILLERS[self.variant]["fc8"][0])
            elif isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def penultimate(self, images: torch.Tensor) -> torch.Tensor:
        """fc7 features after relu7 and before drop7, shape (N, embed_dim), of images (N, 3,
        resolution, resolution); another input size fails in fc6 (its input size follows the pool5
        grid)."""
        return self.embed[:-1](self.pool5(self.features(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits, shape (N, num_classes), of images (N, 3, resolution, resolution)."""
        return self.fc8(self.embed(self.pool5(self.features(images))))

    def replace_classifier(self, num_classes: int, generator: torch.Generator | None = None) -> None:
        """A fresh fc8 with ``num_classes`` outputs (weights N(0, 0.01), bias 0: fc8's fillers in
        both prototxts) for a new task: fine-tuning keeps conv1..fc7. Draws from ``generator`` (torch's
        global one when None). The new layer is on the CPU in float32; move the model afterwards."""
        self.fc8 = nn.Linear(self.embed_dim, num_classes)
        nn.init.normal_(self.fc8.weight, std=0.01, generator=generator)
        nn.init.zeros_(self.fc8.bias)


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, lr_mult: float = 1.0,
                     exclude: set[int] | None = None) -> list[dict]:
    """SGD parameter groups with Caffe's multipliers: weights (every parameter of more than one
    dimension) at ``lr * lr_mult`` with ``weight_decay``, biases (1-d) at twice that rate with no
    decay (``param { lr_mult: 2 decay_mult: 0 }`` of every layer in the prototxts). Parameters
    whose ``id`` is in ``exclude`` are left out (a head with its own groups). Each group also
    holds ``lr_mult`` (the group's rate over the base rate), so a schedule sets ``lr`` from it;
    empty groups are dropped."""
    exclude = exclude or set()
    members: dict[str, list] = {"weight": [], "bias": []}
    for parameter in model.parameters():
        if id(parameter) not in exclude and parameter.requires_grad:
            members["weight" if parameter.dim() > 1 else "bias"].append(parameter)
    groups = []
    for kind, multipliers in (("weight", WEIGHT_MULTIPLIERS), ("bias", BIAS_MULTIPLIERS)):
        if members[kind]:
            rate = lr_mult * multipliers["lr_mult"]
            groups.append({"params": members[kind], "kind": kind, "lr_mult": rate, "lr": lr * rate,
                           "weight_decay": weight_decay * multipliers["decay_mult"]})
    return groups
