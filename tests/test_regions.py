"""The region-based stages' shared pieces: Caffe's step schedule in iterations, the training plan,
SGD with Caffe's lr/decay multipliers and a frozen conv1, the region network's padding and RoI max
pooling at 1/16, flipping boxes."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_pool

from itl_ray.errors import UserError
from itl_ray.models import AlexNet
from itl_ray.transfer.regions import (RegionNetwork, RegionRecipe, Schedule, caffe_sgd, child_generator, flip_boxes,
                                      image_batch, schedule, set_lr, training_plan)


def test_step_schedule_divides_by_ten_at_the_step():
    plan = Schedule(iterations=40000, lr_step=30000)
    assert plan.lr(0.001, 0) == 0.001
    assert plan.lr(0.001, 29999) == 0.001
    assert plan.lr(0.001, 30000) == pytest.approx(0.0001, rel=1e-12)
    assert plan.lr(0.001, 39999) == pytest.approx(0.0001, rel=1e-12)


def test_schedule_in_iterations_or_epochs():
    assert schedule(RegionRecipe(), 5011) == Schedule(40000, 30000)
    # 3 passes over 250 images, 2 per step: 375 steps, the step at the same 3/4 of training.
    assert schedule(RegionRecipe(epochs=3), 250) == Schedule(375, 281)
    assert schedule(RegionRecipe(epochs=1), 1) == Schedule(1, 1)


def test_training_plan_goes_round_in_random_order_without_straddling_passes():
    images = [10, 11, 12, 13, 14]
    pairs = list(training_plan(images, Schedule(6, 4), 2, 0.5, child_generator(0, 1)))
    assert len(pairs) == 12
    # Each pass: two pairs of distinct images (the fifth image waits for the next pass).
    for start in (0, 4, 8):
        chunk = [index for index, _ in pairs[start : start + 4]]
        assert len(set(chunk)) == 4 and set(chunk) <= set(images)
    assert {flip for _, flip in pairs} == {True, False}
    assert pairs == list(training_plan(images, Schedule(6, 4), 2, 0.5, child_generator(0, 1)))
    assert pairs != list(training_plan(images, Schedule(6, 4), 2, 0.5, child_generator(1, 1)))
    assert all(not flip for _, flip in training_plan(images, Schedule(6, 4), 2, 0.0, child_generator(0, 1)))
    # Fewer images than a batch: batches of what there is.
    assert [index for index, _ in training_plan([7], Schedule(3, 3), 2, 0.5, child_generator(0, 1))] == [7, 7, 7]


def small_backbone() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(num_classes=5, width=0.125, resolution=64)


def test_region_network_has_the_detection_nets_padding_and_leaves_the_backbone_alone():
    backbone = small_backbone()
    network = RegionNetwork(backbone)
    convs = [m for m in network.features if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in network.features if isinstance(m, torch.nn.MaxPool2d)]
    assert convs[0].padding == (5, 5) and pools[0].padding == 1 and pools[1].padding == 1
    assert backbone.features[0].padding == (0, 0)  # the caller's network is a separate copy
    # Caffe's arithmetic with that padding: 96 px -> conv1 (96 + 10 - 11) // 4 + 1 = 24 -> pool1
    # ceil((24 + 2 - 3) / 2) + 1 = 13 -> pool2 7 cells; 160 px -> 40 -> 21 -> 11 (600 px -> 39).
    assert network.features(torch.zeros(1, 3, 96, 160)).shape[-2:] == (7, 11)
    assert network.features(torch.zeros(1, 3, 600, 16)).shape[-2] == 39


def test_region_network_max_pools_rois_at_one_sixteenth_to_pool5s_grid():
    network = RegionNetwork(small_backbone()).eval()
    images = torch.randn(2, 3, 96, 128)
    rois = torch.tensor([[0, 0.0, 0.0, 95.0, 95.0], [1, 16.0, 32.0, 63.0, 79.0]])
    conv5 = network.features(images)
    pooled = network.pooled(conv5, rois)
    assert pooled.shape == (2, conv5.shape[1], network.grid, network.grid)
    assert torch.equal(pooled, roi_pool(conv5, rois, output_size=network.grid, spatial_scale=1 / 16))
    # Grid 1 (a 64 px backbone): the max over the cells from round(corner / 16) to round(corner / 16):
    # x 16..63 -> cells 1..4, y 32..79 -> cells 2..5 (Caffe's ROIPooling arithmetic).
    assert torch.equal(pooled[1, :, 0, 0], conv5[1, :, 2:6, 1:5].amax(dim=(1, 2)))
    assert network(images, rois).shape == (2, network.embed_dim)
    aligned = RegionNetwork(small_backbone(), roi_pool="align").eval()
    assert aligned(images, rois).shape == (2, aligned.embed_dim)


def test_caffe_sgd_multipliers_and_frozen_conv1():
    network = RegionNetwork(small_backbone())
    network.freeze_convs(1)
    head = torch.nn.Linear(network.embed_dim, 3)
    model = torch.nn.ModuleDict({"network": network, "head": head})
    conv_ids = {id(p) for conv in network.convs for p in conv.parameters()}
    recipe = RegionRecipe(lr=0.001, weight_decay=0.0005, conv_lr_scale=0.5, head_lr_scale=10)
    optimizer = caffe_sgd(model, conv_ids, {id(p) for p in head.parameters()}, recipe)
    set_lr(optimizer, 0.001)
    groups = {(group["lr"], group["weight_decay"]): {id(p) for p in group["params"]} for group in optimizer.param_groups}
    conv1 = network.convs[0]
    assert all(not p.requires_grad for p in conv1.parameters())
    assert not any(id(p) in ids for ids in groups.values() for p in conv1.parameters())
    assert id(head.weight) in groups[(0.01, 0.0005)] and id(head.bias) in groups[(0.02, 0.0)]
    fc7 = [layer for layer in network.embed if isinstance(layer, torch.nn.Linear)][-1]  # fc6, fc7
    assert id(fc7.weight) in groups[(0.001, 0.0005)] and id(fc7.bias) in groups[(0.002, 0.0)]
    conv2 = network.convs[1]
    assert id(conv2.weight) in groups[(0.0005, 0.0005)] and id(conv2.bias) in groups[(0.001, 0.0)]
    assert all(group["momentum"] == 0.9 for group in optimizer.param_groups)
    # One step: conv1 does not move, the head does.
    before = conv1.weight.clone()
    loss = head(network(torch.randn(1, 3, 64, 64), torch.tensor([[0, 0.0, 0.0, 63.0, 63.0]]))).sum()
    loss.backward()
    optimizer.step()
    assert torch.equal(conv1.weight, before)


def test_flip_boxes_mirrors_pixel_indices():
    boxes = torch.tensor([[0.0, 5.0, 9.0, 20.0], [90.0, 0.0, 99.0, 3.0]])
    assert flip_boxes(boxes, 100).tolist() == [[90.0, 5.0, 99.0, 20.0], [0.0, 0.0, 9.0, 3.0]]
    assert torch.equal(flip_boxes(flip_boxes(boxes, 100), 100), boxes)


def test_image_batch_pads_with_zero_after_normalisation():
    small = torch.full((3, 2, 3), 255, dtype=torch.uint8)
    large = torch.zeros((3, 4, 5), dtype=torch.uint8)
    batch = image_batch([small, large], torch.device("cpu"))
    assert batch.shape == (2, 3, 4, 5)
    assert (batch[0, :, :2, :3] > 0).all() and (batch[0, :, 2:, :] == 0).all() and (batch[0, :, :, 3:] == 0).all()


def test_recipe_errors_name_the_field():
    """Bounds and choices declared on the fields, checked by the config's one validator."""
    from itl_ray.config import validate

    assert validate(RegionRecipe(), "transfer.detection") == RegionRecipe()
    for recipe, message in (
        (RegionRecipe(roi_pool="average"), r"transfer\.detection\.roi_pool='average' is not one of the choices: max, align"),
        (RegionRecipe(image_size=600, max_size=500),
         r"transfer\.detection: max_size \(500\) must be at least image_size \(600\)"),
        (RegionRecipe(frozen_convs=6), r"transfer\.detection\.frozen_convs=6 is out of range; allowed: >= 0 and <= 5"),
        (RegionRecipe(iterations=-1), r"transfer\.detection\.iterations=-1 is out of range; allowed: >= 0"),
        (RegionRecipe(head_lr_scale=-1.0), r"transfer\.detection\.head_lr_scale=-1\.0 is out of range; allowed: >= 0"),
    ):
        with pytest.raises(UserError, match=message):
            validate(recipe, "transfer.detection")
