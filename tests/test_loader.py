"""The input pipeline: what batches hold (shapes, ranges, crops inside the image, flips), that a seed
fixes them whatever the threads or the pixel source, that validation is resize + center crop, and
that the fast pipeline, the GPU gather (run here on the CPU) and the torchvision pipeline agree."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import roi_align

from itl_ray import loader
from itl_ray.errors import UserError
from itl_ray.prepare import PrepareSettings, prepare
from itl_ray.shards import Prepared

CPU = torch.device("cpu")
LEVEL = 1 / 255 / 0.224  # one uint8 level after normalisation (smallest std)


@pytest.fixture(scope="module")
def imagenet(mini_paths) -> Prepared:
    """The mini ImageNet as the demo prepares it (shorter sides 80..104 px, above the 73 px that
    64 px crops are cut from: every crop is resampled)."""
    return Prepared(mini_paths["imagenet"], "imagenet")


@pytest.fixture(scope="module")
def imagenet73(raw_paths, tmp_path_factory) -> Prepared:
    """The same images prepared at the crops' shorter side (73 px for 64 px crops): no resampling."""
    folder = tmp_path_factory.mktemp("shards73") / "imagenet"
    prepare("imagenet", raw_paths["imagenet"], folder, PrepareSettings(short_side=73), workers=1)
    return Prepared(folder, "imagenet")


def rows_of(data: Prepared, split: str = "train", count: int | None = None) -> loader.ImageRows:
    rows = data.rows_in(split)[:count]
    labels = data.column("label")
    classes = {wnid: index for index, wnid in enumerate(sorted(set(labels)))}
    return loader.ImageRows(data, rows, [classes[labels[row]] for row in rows])


def gather(batches) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batches)
    return torch.cat(images), torch.cat(labels)


def fast(images, train=True, **settings) -> loader.FastLoader:
    settings = {"workers": 2, "cache_gib": 0.0, **settings}
    return loader.FastLoader(images, 64, 50, CPU, train=train, **settings)


def seeded(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------

def random_sizes(count=400, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(40, 400, count), rng.integers(40, 400, count)


@pytest.mark.parametrize("augment", loader.AUGMENTATIONS)
def test_plans_cut_windows_inside_the_resized_image(augment):
    heights, widths = random_sizes()
    _, numbers, _ = loader.draw_epoch(len(heights), augment, 64, 50, seeded())
    for plan in (loader.train_plan(augment, numbers, heights, widths, 64), loader.center_plan(heights, widths, 64)):
        resized_h, resized_w, top, left, height, width = plan.T
        assert (top >= 0).all() and (left >= 0).all() and (height >= 1).all() and (width >= 1).all()
        assert (top + height <= resized_h).all() and (left + width <= resized_w).all()


def test_crop_recipe_is_cafes_random_crop_of_the_resized_center_square():
    heights, widths = random_sizes()
    _, offsets, _ = loader.draw_epoch(len(heights), "crop", 64, 50, seeded())
    resized_h, resized_w, top, left, height, width = loader.crop_plan(offsets, heights, widths, 64).T
    assert (np.minimum(resized_h, resized_w) == 73).all() and (height == 64).all() and (width == 64).all()
    offset_y, offset_x = top - (resized_h - 73) // 2, left - (resized_w - 73) // 2
    assert offset_y.min() == 0 and offset_y.max() == 9 and offset_x.min() == 0 and offset_x.max() == 9


def test_resized_crops_follow_torchvisions_area_and_aspect_ranges():
    heights, widths = random_sizes(2000)
    _, uniforms, _ = loader.draw_epoch(len(heights), "random_resized_crop", 64, 50, seeded())
    resized_h, resized_w, _, _, height, width = loader.resized_crop_plan(uniforms, heights, widths).T
    assert (resized_h == heights).all() and (resized_w == widths).all()  # cut from the image as stored
    area = height * width / (heights * widths)
    aspect = width / height
    assert area.min() > 0.07 and area.max() <= 1.0 and 0.2 < area.mean() < 0.7
    assert aspect.min() > 0.70 and aspect.max() < 1.42  # 3/4..4/3, up to rounding


def test_the_epoch_draw_depends_only_on_the_generator():
    first = loader.draw_epoch(100, "crop", 64, 30, seeded(5))
    again = loader.draw_epoch(100, "crop", 64, 30, seeded(5))
    other = loader.draw_epoch(100, "crop", 64, 30, seeded(6))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    assert sorted(first[0]) == list(range(100)) and 20 < first[2].sum() < 80


def test_crop_draws_are_those_of_the_loop_before_the_fast_pipeline():
    """A seed keeps training on the crops it did before: per batch, tops, lefts, flips."""
    generator = seeded(11)
    order = torch.randperm(100, generator=generator)
    expected = []
    for start in range(0, 100, 30):
        size = min(30, 100 - start)
        tops = torch.randint(0, 10, (size,), generator=generator)
        lefts = torch.randint(0, 10, (size,), generator=generator)
        flips = torch.rand(size, generator=generator) < 0.5
        expected.append((tops, lefts, flips))
    got_order, offsets, got_flips = loader.draw_epoch(100, "crop", 64, 30, seeded(11))
    assert got_order.tolist() == order.tolist()
    assert offsets[:, 0].tolist() == torch.cat([t for t, _, _ in expected]).tolist()
    assert offsets[:, 1].tolist() == torch.cat([l for _, l, _ in expected]).tolist()
    assert got_flips.tolist() == torch.cat([f for _, _, f in expected]).tolist()


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def test_training_batches_cover_the_epoch_with_normalised_crops(imagenet):
    images = rows_of(imagenet)
    with fast(images) as batches:
        sizes, all_labels = [], []
        for x, y in batches.epoch(seeded()):
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 64, 64) and y.dtype == torch.int64
            low = ((0 - loader.MEAN) / loader.STD).min().item()
            high = ((1 - loader.MEAN) / loader.STD).max().item()
            assert low - 1e-5 <= x.min().item() and x.max().item() <= high + 1e-5
            sizes.append(len(x))
            all_labels.append(y)
    assert sizes == [50] * (len(images) // 50) + ([len(images) % 50] if len(images) % 50 else [])
    assert sorted(torch.cat(all_labels).tolist()) == sorted(images.labels.tolist())  # each image once


def test_labels_follow_their_images(imagenet73):
    images = rows_of(imagenet73, count=120)
    order, _, _ = loader.draw_epoch(len(images), "crop", 64, 50, seeded(3))
    with fast(images) as batches:
        _, labels = gather(batches.epoch(seeded(3)))
    assert labels.tolist() == images.labels[order].tolist()


def test_flip_mirrors_the_crop():
    image = torch.randint(0, 256, (3, 80, 100), dtype=torch.uint8)
    plan = np.array([73, 91, 3, 11, 64, 64])
    plain, flipped = loader.crop_image(image, plan, False, 64), loader.crop_image(image, plan, True, 64)
    assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(flipped, plain)


def test_same_seed_same_batches_whatever_the_threads_or_the_cache(imagenet73):
    images = rows_of(imagenet73, count=200)
    with fast(images, workers=1) as one, fast(images, workers=3, prefetch=1) as three, \
            fast(images, cache_gib=1.0) as cached:
        assert cached.cache is not None and one.cache is None
        reference = gather(one.epoch(seeded(1)))
        for other in (three, cached):
            got = gather(other.epoch(seeded(1)))
            assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])
        assert not torch.equal(gather(one.epoch(seeded(2)))[0], reference[0])


def test_validation_is_resize_then_center_crop(imagenet, imagenet73):
    for data, tolerance in ((imagenet73, 0.0), (imagenet, LEVEL * 1.01)):
        images = rows_of(data, "val")
        expected = loader.normalize(loader.center_crops(loader.load_squares(data.read(images.rows), 73), 64))
        for cache_gib in (0.0, 1.0):
            with fast(images, train=False, cache_gib=cache_gib) as batches:
                got, labels = gather(batches.epoch())
            assert (got - expected).abs().max().item() <= tolerance + 1e-6
            assert labels.tolist() == images.labels.tolist()


@pytest.mark.parametrize("augment", loader.AUGMENTATIONS)
def test_fast_and_torchvision_pipelines_cut_the_same_pixels(imagenet, imagenet73, augment):
    """Same plan, same pixels: exactly, when the shards hold the crops' shorter side; within a couple
    of uint8 levels (PIL's and torch's resampling round differently) when they do not."""
    for data, exact in ((imagenet73, augment == "crop"), (imagenet, False)):
        images = rows_of(data, count=150)
        with fast(images, augment=augment) as ours, \
                loader.TorchvisionLoader(images, 64, 50, CPU, augment=augment, workers=2) as theirs:
            x_fast, y_fast = gather(ours.epoch(seeded(4)))
            x_torchvision, y_torchvision = gather(theirs.epoch(seeded(4)))
        assert torch.equal(y_fast, y_torchvision)
        difference = (x_fast - x_torchvision).abs()
        if exact:
            assert torch.equal(x_fast, x_torchvision)
        else:
            assert difference.mean().item() < 0.1 * LEVEL and difference.max().item() <= 3 * LEVEL


def test_a_broken_image_names_its_row(imagenet73, monkeypatch):
    images = rows_of(imagenet73, count=60)
    with fast(images) as batches:
        views = batches.reader.views

        def corrupt(rows):
            out = views(rows)
            out[1] = torch.zeros(100, dtype=torch.uint8)
            return out

        monkeypatch.setattr(batches.reader, "views", corrupt)
        with pytest.raises(UserError, match=r"cannot decode image row \d+ of .*prepare its dataset again"):
            gather(batches.epoch(seeded()))


def test_shard_views_are_the_stored_bytes(imagenet):
    rows = imagenet.rows_in("val")[::7]
    views = loader.ShardBytes(imagenet).views(rows)
    assert [bytes(view.numpy()) for view in views] == imagenet.read(rows)


# ---------------------------------------------------------------------------------------------
# The GPU gather, run on the CPU
# ---------------------------------------------------------------------------------------------

def reference_resample(image, box, flip, size):
    """``resample``'s definition, one output pixel at a time (float64)."""
    top, left, height, width = box
    taps_y = int(np.clip(math.ceil(height / size - 0.5), 1, loader.MAX_TAPS))
    taps_x = int(np.clip(math.ceil(width / size - 0.5), 1, loader.MAX_TAPS))
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
    out = loader.resample(flat, starts, heights, widths, boxes, flips, 24)
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
    monkeypatch.setattr(loader, "CHUNK_ELEMENTS", 3 * 32 * 32 * 2)  # two images per gather
    images = torch.randint(0, 256, (5, 3, 40, 50), dtype=torch.uint8)
    boxes = np.array([[i, 2 * i, 32, 32] for i in range(5)], dtype=np.float64)
    flips = np.array([True, False, True, False, True])
    out = loader.resample(images.reshape(-1), np.arange(5) * 3 * 40 * 50, np.full(5, 40), np.full(5, 50), boxes,
                          flips, 32)
    for i in range(5):
        window = images[i, :, i : i + 32, 2 * i : 2 * i + 32].float()
        assert torch.equal(out[i], window.flip(-1) if flips[i] else window)


def test_the_gpu_gather_cuts_the_planned_pixels(imagenet, imagenet73):
    """What the GPU path computes (nvJPEG decode + ``resample``), emulated on the CPU, against the CPU
    threads: identical for exact windows, close where the GPU gather resamples without antialiasing."""
    for data, exact in ((imagenet73, True), (imagenet, False)):
        images = rows_of(data, count=100)
        with fast(images) as batches:
            expected, _ = gather(batches.epoch(seeded(7)))
        order, offsets, flips = loader.draw_epoch(len(images), "crop", 64, 50, seeded(7))
        heights, widths = (column[order] for column in images.sizes())
        plans = loader.crop_plan(offsets, heights, widths, 64)
        decoded = [loader.decode_rgb(view, "x") for view in loader.ShardBytes(data).views(images.rows[order])]
        flat = torch.cat([image.reshape(-1) for image in decoded])
        starts = np.concatenate([[0], np.cumsum(3 * heights * widths)[:-1]])
        got = loader._normalize_(loader.resample(flat, starts, heights, widths,
                                                 loader.source_boxes(plans, heights, widths), flips, 64))
        difference = (got - expected).abs()
        if exact:
            assert difference.max().item() < 1e-4
        else:
            assert difference.mean().item() < 2 * LEVEL


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_the_gpu_producer_path_runs_on_a_cpu(imagenet73, share):
    """The GPU path's producer thread (decode list + gather, CPU share on the threads, ring of host
    buffers, hand-off queue), run without CUDA: the same batches as the CPU threads make."""
    images = rows_of(imagenet73, count=230)
    with fast(images) as threads:
        expected, expected_labels = gather(threads.epoch(seeded(9)))
    with fast(images, prefetch=2, cpu_decode_share=share, channels_last=True) as producer:
        producer._producer = True
        batches = list(producer.epoch(seeded(9)))
        got, labels = gather(batches)
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
        assert torch.equal(labels, expected_labels) and (got - expected).abs().max().item() < 1e-4
        first = next(iter(producer.epoch(seeded(9))))  # leaving an epoch early stops its producer
        assert torch.equal(first[1], expected_labels[:50])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_pipeline_matches_the_cpu_threads(imagenet73):
    images = rows_of(imagenet73, count=300)
    with fast(images) as cpu:
        expected, expected_labels = gather(cpu.epoch(seeded(8)))
    cuda = torch.device("cuda")
    for share, cache_gib in ((0.0, 0.0), (0.5, 0.0), (0.0, 1.0)):
        with loader.FastLoader(images, 64, 64, cuda, workers=2, cache_gib=cache_gib, cpu_decode_share=share,
                               channels_last=True) as gpu:
            got, labels = gather(gpu.epoch(seeded(8)))
        assert got.is_cuda and torch.equal(labels.cpu(), expected_labels)
        assert (got.cpu() - expected).abs().max().item() < 1e-4
