"""AlexNet as the study's network: layer shapes, the pool5 grid at each resolution, the parameter
count of Caffe's AlexNet, narrow widths, and a fresh classifier for a transfer task."""

from __future__ import annotations

import pytest
import torch

from itl_ray.models import AlexNet, pool5_grid, scaled


def shapes(model: AlexNet) -> dict[str, tuple[int, ...]]:
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters() if name.endswith("weight")}


def test_full_width_at_227_px_is_caffes_alexnet():
    model = AlexNet(1000)
    assert shapes(model) == {
        "features.0.weight": (96, 3, 11, 11),
        "features.4.weight": (256, 48, 5, 5),  # two groups of 48 input channels
        "features.8.weight": (384, 256, 3, 3),
        "features.10.weight": (384, 192, 3, 3),
        "features.12.weight": (256, 192, 3, 3),
        "embed.2.weight": (4096, 256 * 6 * 6),  # fc6 reads the 6x6 pool5 grid
        "embed.5.weight": (4096, 4096),
        "fc8.weight": (1000, 4096),
    }
    # 60,965,224: the parameter count of Caffe's bvlc_alexnet (grouped conv2, conv4, conv5).
    assert sum(parameter.numel() for parameter in model.parameters()) == 60_965_224
    assert model.grid == 6 and model.embed_dim == 4096 and model.conv5_channels == 256


@pytest.mark.parametrize("resolution, conv5, grid", [(227, 13, 6), (224, 13, 6), (71, 4, 2), (64, 3, 1), (39, 2, 1)])
def test_pool5_grid_follows_the_resolution(resolution, conv5, grid):
    assert pool5_grid(resolution) == grid
    model = AlexNet(7, width=0.125, resolution=resolution).eval()
    images = torch.zeros(2, 3, resolution, resolution)
    with torch.no_grad():
        features = model.features(images)
        assert tuple(features.shape) == (2, 32, conv5, conv5)  # 256 x 0.125 channels at stride ~16
        assert tuple(model.pool5(features).shape) == (2, 32, grid, grid)
        assert tuple(model.penultimate(images).shape) == (2, 512)
        assert tuple(model(images).shape) == (2, 7)


@pytest.mark.parametrize("resolution", [38, 18, 11])
def test_too_small_an_input_is_refused(resolution):
    with pytest.raises(ValueError, match=rf"resolution {resolution} is too small for AlexNet \(at least 39 px\)"):
        AlexNet(10, resolution=resolution)


def test_the_demos_network():
    model = AlexNet(40, width=0.25, resolution=64)
    assert [scaled(c, 0.25) for c in (96, 256, 384, 384, 256, 4096)] == [24, 64, 96, 96, 64, 1024]
    assert shapes(model)["embed.2.weight"] == (1024, 64)  # pool5 is a single 1x1 cell at 64 px
    assert sum(parameter.numel() for parameter in model.parameters()) == 1_309_832
    assert scaled(96, 0.01) == 8  # never fewer than 8 channels


def test_replace_classifier_keeps_the_backbone():
    torch.manual_seed(0)
    model = AlexNet(40, width=0.25, resolution=64)
    backbone = {name: value.clone() for name, value in model.state_dict().items() if not name.startswith("fc8")}
    model.replace_classifier(21)
    assert tuple(model.fc8.weight.shape) == (21, 1024) and tuple(model.fc8.bias.shape) == (21,)
    assert torch.all(model.fc8.bias == 0)
    assert 0.008 < model.fc8.weight.std().item() < 0.012  # N(0, 0.01), as a fresh fc8
    for name, value in model.state_dict().items():
        if not name.startswith("fc8"):
            assert torch.equal(value, backbone[name]), name
    assert tuple(model.eval()(torch.zeros(3, 3, 64, 64)).shape) == (3, 21)
