"""The crop plans: windows inside the resized image, Caffe's random crops and torchvision's
random resized crops drawn from one generator exactly as before, and a plan row applied to an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itl_ray import crop_plans


def seeded(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_sizes(count=400, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(40, 400, count), rng.integers(40, 400, count)


@pytest.mark.parametrize("augment", crop_plans.AUGMENTATIONS)
def test_plans_cut_windows_inside_the_resized_image(augment):
    heights, widths = random_sizes()
    _, numbers, _ = crop_plans.draw_epoch(len(heights), augment, 64, 50, seeded())
    for plan in (crop_plans.train_plan(augment, numbers, heights, widths, 64),
                 crop_plans.center_plan(heights, widths, 64)):
        resized_h, resized_w, top, left, height, width = plan.T
        assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
        assert (top + height <= resized_h).all() and (left + width <= resized_w).all()


def test_crop_recipe_is_cafes_random_crop_of_the_resized_center_square():
    heights, widths = random_sizes()
    _, offsets, _ = crop_plans.draw_epoch(len(heights), "crop", 64, 50, seeded())
    resized_h, resized_w, top, left, height, width = crop_plans.crop_plan(offsets, heights, widths, 64).T
    assert (np.minimum(resized_h, resized_w) == 72).all() and (height == 64).all() and (width == 64).all()
    offset_y, offset_x = top - (resized_h - 72) // 2, left - (resized_w - 72) // 2
    assert offset_y.min() == 0 and offset_y.max() == 8 and offset_x.min() == 0 and offset_x.max() == 8


def test_resized_crops_follow_torchvisions_area_and_aspect_ranges():
    heights, widths = random_sizes(2000)
    _, uniforms, _ = crop_plans.draw_epoch(len(heights), "random_resized_crop", 64, 50, seeded())
    resized_h, resized_w, _, _, height, width = crop_plans.resized_crop_plan(uniforms, heights, widths).T
    assert (resized_h == heights).all() and (resized_w == widths).all()  # cut from the image as stored
    area = height * width / (heights * widths)
    aspect = width / height
    assert area.min() > 0.07 and area.max() <= 1.0 and 0.2 < area.mean() < 0.7
    assert aspect.min() > 0.70 and aspect.max() < 1.42  # 3/4..4/3, up to rounding


def test_the_epoch_draw_depends_only_on_the_generator():
    first = crop_plans.draw_epoch(100, "crop", 64, 30, seeded(5))
    again = crop_plans.draw_epoch(100, "crop", 64, 30, seeded(5))
    other = crop_plans.draw_epoch(100, "crop", 64, 30, seeded(6))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    assert sorted(first[0]) == list(range(100)) and 20 < first[2].sum() < 80


def test_crop_draws_are_those_of_the_loop_before_the_fast_pipeline():
    """A seed draws its crops as the loop always has: per batch, tops, lefts (0..8 for 64 px crops of
    72 px squares), flips."""
    generator = seeded(11)
    order = torch.randperm(100, generator=generator)
    expected = []
    for start in range(0, 100, 30):
        size = min(30, 100 - start)
        tops = torch.randint(0, 9, (size,), generator=generator)
        lefts = torch.randint(0, 9, (size,), generator=generator)
        flips = torch.rand(size, generator=generator) < 0.5
        expected.append((tops, lefts, flips))
    got_order, offsets, got_flips = crop_plans.draw_epoch(100, "crop", 64, 30, seeded(11))
    assert got_order.tolist() == order.tolist()
    assert offsets[:, 0].tolist() == torch.cat([t for t, _, _ in expected]).tolist()
    assert offsets[:, 1].tolist() == torch.cat([l for _, l, _ in expected]).tolist()
    assert got_flips.tolist() == torch.cat([f for _, _, f in expected]).tolist()


def test_flip_mirrors_the_crop():
    image = torch.randint(0, 256, (3, 80, 100), dtype=torch.uint8)
    plan = np.array([72, 90, 3, 11, 64, 64])
    plain, flipped = crop_plans.crop_image(image, plan, False, 64), crop_plans.crop_image(image, plan, True, 64)
    assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(flipped, plain)




def test_a_default_crop_never_upsamples():
    """Caffe's recipe as the defaults give it: ImageNet prepared at 256 px (`itl-ray prepare`'s
    default), the study's 227 px crops. Every training crop and every validation crop is a window of
    the image as stored: neither the image nor the window is resized, so nothing is upsampled."""
    from itl_ray.config import ModelConfig
    from itl_ray.images import CAFFE_CROP, CAFFE_SHORT_SIDE, short_side_for
    from itl_ray.prepare import DEFAULT_SHORT_SIDE
    from itl_ray.pretrain import PretrainConfig

    resolution, stored = ModelConfig().resolution, DEFAULT_SHORT_SIDE["imagenet"]
    assert (resolution, stored) == (CAFFE_CROP, CAFFE_SHORT_SIDE) == (227, 256)
    assert short_side_for(resolution) == stored == DEFAULT_SHORT_SIDE["sun397"]  # the scene stage's squares too
    rng = np.random.default_rng(0)
    longer = rng.integers(stored, 700, 500)
    portrait = rng.random(500) < 0.3
    heights, widths = np.where(portrait, longer, stored), np.where(portrait, stored, longer)
    augment = PretrainConfig().augment
    _, numbers, _ = crop_plans.draw_epoch(len(heights), augment, resolution, 64, seeded())
    for plan in (crop_plans.train_plan(augment, numbers, heights, widths, resolution),
                 crop_plans.center_plan(heights, widths, resolution)):
        resized_h, resized_w, top, left, height, width = plan.T
        assert (resized_h == heights).all() and (resized_w == widths).all()  # the image is not resized
        assert (height == resolution).all() and (width == resolution).all()  # nor is the window
    # Images stored larger (e.g. prepared with --short-side 0) are only ever scaled down.
    heights, widths = heights + rng.integers(0, 300, 500), widths + rng.integers(0, 300, 500)
    resized_h, resized_w, *_ = crop_plans.train_plan(augment, numbers, heights, widths, resolution).T
    assert (resized_h <= heights).all() and (resized_w <= widths).all()
