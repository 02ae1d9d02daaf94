"""AlexNet as Caffe's prototxts define it: layer shapes and order (LRN before or after pooling),
dropout after relu6 and relu7, the parameter count, Caffe's Gaussian fillers, the parameter groups
(biases at twice the rate, not decayed), the pool5 grid at each resolution, narrow widths, and a
fresh classifier for a transfer task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from itl_ray.models import CAFFE_FILLERS, VARIANTS, AlexNet, parameter_groups, pool5_grid, scaled


def shapes(model: AlexNet) -> dict[str, tuple[int, ...]]:
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_width_at_227_px_is_caffes_alexnet(variant):
    model = AlexNet(1000, variant=variant)
    assert shapes(model) == {
        "features.conv1.weight": (96, 3, 11, 11), "features.conv1.bias": (96,),
        "features.conv2.weight": (256, 48, 5, 5), "features.conv2.bias": (256,),  # group: 2
        "features.conv3.weight": (384, 256, 3, 3), "features.conv3.bias": (384,),
        "features.conv4.weight": (384, 192, 3, 3), "features.conv4.bias": (384,),  # group: 2
        "features.conv5.weight": (256, 192, 3, 3), "features.conv5.bias": (256,),  # group: 2
        "embed.fc6.weight": (4096, 256 * 6 * 6), "embed.fc6.bias": (4096,),  # fc6 reads the 6x6 pool5 grid
        "embed.fc7.weight": (4096, 4096), "embed.fc7.bias": (4096,),
        "fc8.weight": (1000, 4096), "fc8.bias": (1000,),
    }
    # 60,965,224: the parameter count of both Caffe prototxts (grouped conv2, conv4, conv5).
    assert sum(parameter.numel() for parameter in model.parameters()) == 60_965_224
    assert model.grid == 6 and model.embed_dim == 4096 and model.conv5_channels == 256
    strides = {name: (layer.kernel_size, layer.stride, layer.padding, layer.groups)
               for name, layer in model.layers().items() if isinstance(layer, nn.Conv2d)}
    assert strides == {"conv1": ((11, 11), (4, 4), (0, 0), 1), "conv2": ((5, 5), (1, 1), (2, 2), 2),
                       "conv3": ((3, 3), (1, 1), (1, 1), 1), "conv4": ((3, 3), (1, 1), (1, 1), 2),
                       "conv5": ((3, 3), (1, 1), (1, 1), 2)}


def test_the_two_prototxts_differ_in_the_order_of_pooling_and_normalisation():
    caffenet = [name for name, _ in AlexNet(10, variant="bvlc_reference_caffenet").features.named_children()]
    alexnet = [name for name, _ in AlexNet(10, variant="bvlc_alexnet").features.named_children()]
    assert caffenet[:8] == ["conv1", "relu1", "pool1", "norm1", "conv2", "relu2", "pool2", "norm2"]
    assert alexnet[:8] == ["conv1", "relu1", "norm1", "pool1", "conv2", "relu2", "norm2", "pool2"]
    assert caffenet[8:] == alexnet[8:] == ["conv3", "relu3", "conv4", "relu4", "conv5", "relu5"]
    norm = AlexNet(10).features.norm1
    assert (norm.size, norm.alpha, norm.beta, norm.k) == (5, 1e-4, 0.75, 1.0)  # lrn_param local_size, alpha, beta
    assert AlexNet(10).pool5.ceil_mode  # Caffe rounds pooled sizes up


def test_dropout_follows_relu6_and_relu7_and_fc7_features_come_before_drop7():
    model = AlexNet(10, width=0.125, resolution=64)
    assert [name for name, _ in model.embed.named_children()] == ["flatten", "fc6", "relu6", "drop6", "fc7",
                                                                   "relu7", "drop7"]
    assert model.embed.drop6.p == model.embed.drop7.p == 0.5
    images = torch.randn(6, 3, 64, 64)
    model.train()
    torch.manual_seed(0)
    features = model.penultimate(images)
    assert (features >= 0).all() and (features > 0).float().mean() > 0.5  # after relu7, no dropout zeros
    torch.manual_seed(0)
    fc7 = model.embed(model.pool5(model.features(images)))  # what fc8 reads in training: drop7's output
    kept = fc7 != 0
    assert torch.allclose(fc7[kept], 2 * features[kept])  # inverted dropout scales the kept half by 2
    assert 0.3 < 1 - kept.float().mean() < 0.7
    model.eval()
    assert torch.equal(model.embed(model.pool5(model.features(images))), model.penultimate(images))


@pytest.mark.parametrize("variant", VARIANTS)
def test_caffes_gaussian_fillers(variant):
    torch.manual_seed(0)
    model = AlexNet(1000, variant=variant)
    for name, layer in model.layers().items():
        std, bias = CAFFE_FILLERS[variant][name]
        assert layer.weight.mean().abs() < 0.1 * std, name
        assert layer.weight.std().item() == pytest.approx(std, rel=0.02), name
        assert torch.all(layer.bias == bias), name
    expected = {"bvlc_reference_caffenet": 1.0, "bvlc_alexnet": 0.1}[variant]
    assert [CAFFE_FILLERS[variant][name][1] for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7",
                                                         "fc8")] == [0, expected, 0, expected, expected, expected,
                                                                     expected, 0]
    assert [CAFFE_FILLERS[variant][name][0] for name in ("fc6", "fc7")] == [0.005, 0.005]


def test_kaiming_initialisation_is_a_setting():
    torch.manual_seed(0)
    model = AlexNet(40, width=0.25, resolution=64, init="kaiming")
    fc6 = model.embed.fc6.weight
    assert fc6.std().item() == pytest.approx((2 / fc6.shape[1]) ** 0.5, rel=0.05)  # He: sqrt(2 / fan_in)
    assert all(torch.all(layer.bias == 0) for layer in model.layers().values())
    with pytest.raises(ValueError, match="init must be one of caffe, kaiming, got 'xavier'"):
        AlexNet(10, init="xavier")
    with pytest.raises(ValueError, match="variant must be one of bvlc_reference_caffenet, bvlc_alexnet"):
        AlexNet(10, variant="vgg")


def test_parameter_groups_give_biases_twice_the_rate_and_no_decay():
    model = AlexNet(1000)
    weights, biases = parameter_groups(model, lr=0.01, weight_decay=5e-4)
    assert (weights["kind"], weights["lr"], weights["weight_decay"], weights["lr_mult"]) == ("weight", 0.01, 5e-4, 1.0)
    assert (biases["kind"], biases["lr"], biases["weight_decay"], biases["lr_mult"]) == ("bias", 0.02, 0.0, 2.0)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    assert sorted(names[id(p)] for p in weights["params"]) == sorted(n for n in names.values() if n.endswith("weight"))
    assert sorted(names[id(p)] for p in biases["params"]) == sorted(n for n in names.values() if n.endswith("bias"))
    assert len(weights["params"]) == len(biases["params"]) == 8
    # A new head's parameters can be left out, for groups of their own (fine-tuning: 10x and 20x).
    head = {id(model.fc8.weight), id(model.fc8.bias)}
    body = parameter_groups(model, 0.001, 5e-4, exclude=head)
    assert sum(len(group["params"]) for group in body) == 14
    head_groups = parameter_groups(model.fc8, 0.001, 5e-4, lr_mult=10)
    assert [group["lr"] for group in head_groups] == pytest.approx([0.01, 0.02])
    # torch's SGD keeps the extra keys, and they are plain values (checkpoints load with weights_only).
    optimizer = torch.optim.SGD(parameter_groups(model, 0.01, 5e-4), lr=0.01, momentum=0.9)
    assert [(g["kind"], g["lr_mult"]) for g in optimizer.state_dict()["param_groups"]] == [("weight", 1.0),
                                                                                           ("bias", 2.0)]


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
    assert shapes(model)["embed.fc6.weight"] == (1024, 64)  # pool5 is a single 1x1 cell at 64 px
    assert sum(parameter.numel() for parameter in model.parameters()) == 1_309_832
    assert scaled(96, 0.01) == 8  # never fewer than 8 channels


def test_replace_classifier_keeps_the_backbone():
    torch.manual_seed(0)
    model = AlexNet(40, width=0.25, resolution=64)
    backbone = {name: value.clone() for name, value in model.state_dict().items() if not name.startswith("fc8")}
    model.replace_classifier(21, generator=torch.Generator().manual_seed(3))
    assert tuple(model.fc8.weight.shape) == (21, 1024) and tuple(model.fc8.bias.shape) == (21,)
    assert torch.all(model.fc8.bias == 0)
    assert 0.008 < model.fc8.weight.std().item() < 0.012  # N(0, 0.01), as a fresh fc8
    first = model.fc8.weight.clone()
    model.replace_classifier(21, generator=torch.Generator().manual_seed(3))
    assert torch.equal(model.fc8.weight, first)  # drawn from the generator given
    for name, value in model.state_dict().items():
        if not name.startswith("fc8"):
            assert torch.equal(value, backbone[name]), name
    assert tuple(model.eval()(torch.zeros(3, 3, 64, 64)).shape) == (3, 21)
