"""The fast input pipeline: what batches hold (shapes, ranges, crops inside the image, flips), that a
seed fixes them whatever the threads or the pixel source, that validation is resize + center crop,
and that the fast pipeline, its GPU path (run here on the CPU) and the torchvision pipeline agree."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itl_ray import crop_plans, image_rows, images as image_ops, resample
from itl_ray.errors import UserError
from itl_ray.fast_loader import FastLoader
from itl_ray.images import short_side_for
from itl_ray.prepare import PrepareSettings, prepare
from itl_ray.shards import Prepared
from itl_ray.torchvision_loader import TorchvisionLoader

CPU = torch.device("cpu")
LEVEL = 1 / 255 / 0.224  # one uint8 level after normalisation (smallest std)


@pytest.fixture(scope="module")
def imagenet(mini_paths) -> Prepared:
    """The mini ImageNet as the demo prepares it (shorter sides 80..104 px, above the 72 px that
    64 px crops are cut from: every crop is resampled)."""
    return Prepared(mini_paths["imagenet"], "imagenet")


@pytest.fixture(scope="module")
def imagenet_at_crop_side(raw_paths, tmp_path_factory) -> Prepared:
    """The same images prepared at the crops' shorter side (72 px for 64 px crops): no resampling."""
    folder = tmp_path_factory.mktemp("shards72") / "imagenet"
    prepare("imagenet", raw_paths["imagenet"], folder, PrepareSettings(short_side=short_side_for(64)), workers=1)
    return Prepared(folder, "imagenet")


def rows_of(data: Prepared, split: str = "train", count: int | None = None) -> image_rows.ImageRows:
    rows = data.rows_in(split)[:count]
    labels = data.column("label")
    classes = {wnid: index for index, wnid in enumerate(sorted(set(labels)))}
    return image_rows.ImageRows(data, rows, [classes[labels[row]] for row in rows])


def gather(batches) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*batches)
    return torch.cat(images), torch.cat(labels)


def fast(images, train=True, **settings) -> FastLoader:
    settings = {"workers": 2, "cache_gib": 0.0, **settings}
    return FastLoader(images, 64, 50, CPU, train=train, **settings)


def seeded(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

def test_training_batches_cover_the_epoch_with_normalised_crops(imagenet):
    images = rows_of(imagenet)
    with fast(images) as batches:
        sizes, all_labels = [], []
        for x, y in batches.epoch(seeded()):
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 64, 64) and y.dtype == torch.int64
            low = ((0 - image_ops.MEAN) / image_ops.STD).min().item()
            high = ((1 - image_ops.MEAN) / image_ops.STD).max().item()
            assert low - 1e-5 <= x.min().item() and x.max().item() <= high + 1e-5
            sizes.append(len(x))
            all_labels.append(y)
    assert sizes == [50] * (len(images) // 50) + ([len(images) % 50] if len(images) % 50 else [])
    assert sorted(torch.cat(all_labels).tolist()) == sorted(images.labels.tolist())  # each image once


def test_labels_follow_their_images(imagenet_at_crop_side):
    images = rows_of(imagenet_at_crop_side, count=120)
    order, _, _ = crop_plans.draw_epoch(len(images), "crop", 64, 50, seeded(3))
    with fast(images) as batches:
        _, labels = gather(batches.epoch(seeded(3)))
    assert labels.tolist() == images.labels[order].tolist()


def test_same_seed_same_batches_whatever_the_threads_or_the_cache(imagenet_at_crop_side):
    images = rows_of(imagenet_at_crop_side, count=200)
    with fast(images, workers=1) as one, fast(images, workers=3, prefetch=1) as three, \
            fast(images, cache_gib=1.0) as cached:
        assert cached.cache is not None and one.cache is None
        reference = gather(one.epoch(seeded(1)))
        for other in (three, cached):
            got = gather(other.epoch(seeded(1)))
            assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])
        assert not torch.equal(gather(one.epoch(seeded(2)))[0], reference[0])


def test_validation_is_resize_then_center_crop(imagenet, imagenet_at_crop_side):
    for data, tolerance in ((imagenet_at_crop_side, 0.0), (imagenet, LEVEL * 1.01)):
        images = rows_of(data, "val")
        expected = image_ops.normalize(image_ops.center_crops(image_ops.load_squares(data.read(images.rows), short_side_for(64)), 64))
        for cache_gib in (0.0, 1.0):
            with fast(images, train=False, cache_gib=cache_gib) as batches:
                got, labels = gather(batches.epoch())
            assert (got - expected).abs().max().item() <= tolerance + 1e-6
            assert labels.tolist() == images.labels.tolist()


@pytest.mark.parametrize("augment", crop_plans.AUGMENTATIONS)
def test_fast_and_torchvision_pipelines_cut_the_same_pixels(imagenet, imagenet_at_crop_side, augment):
    """Same plan, same pixels: exactly, when the shards hold the crops' shorter side; within a couple
    of uint8 levels (PIL's and torch's resampling round differently) when they do not."""
    for data, exact in ((imagenet_at_crop_side, augment == "crop"), (imagenet, False)):
        images = rows_of(data, count=150)
        with fast(images, augment=augment) as ours, \
                TorchvisionLoader(images, 64, 50, CPU, augment=augment, workers=2) as theirs:
            x_fast, y_fast = gather(ours.epoch(seeded(4)))
            x_torchvision, y_torchvision = gather(theirs.epoch(seeded(4)))
        assert torch.equal(y_fast, y_torchvision)
        difference = (x_fast - x_torchvision).abs()
        if exact:
            assert torch.equal(x_fast, x_torchvision)
        else:
            assert difference.mean().item() < 0.1 * LEVEL and difference.max().item() <= 3 * LEVEL


def test_a_broken_image_names_its_row(imagenet_at_crop_side, monkeypatch):
    images = rows_of(imagenet_at_crop_side, count=60)
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
    views = image_rows.ShardBytes(imagenet).views(rows)
    assert [bytes(view.numpy()) for view in views] == imagenet.read(rows)


def test_the_gpu_gather_cuts_the_planned_pixels(imagenet, imagenet_at_crop_side):
    """What the GPU path computes (nvJPEG decode + ``resample``), emulated on the CPU, against the CPU
    threads: identical for exact windows, close where the GPU gather resamples without antialiasing."""
    for data, exact in ((imagenet_at_crop_side, True), (imagenet, False)):
        images = rows_of(data, count=100)
        with fast(images) as batches:
            expected, _ = gather(batches.epoch(seeded(7)))
        order, offsets, flips = crop_plans.draw_epoch(len(images), "crop", 64, 50, seeded(7))
        heights, widths = (column[order] for column in images.sizes())
        plans = crop_plans.crop_plan(offsets, heights, widths, 64)
        decoded = [image_ops.decode_rgb(view, "x") for view in image_rows.ShardBytes(data).views(images.rows[order])]
        flat = torch.cat([image.reshape(-1) for image in decoded])
        starts = np.concatenate([[0], np.cumsum(3 * heights * widths)[:-1]])
        got = image_ops.normalize_(resample.resample(flat, starts, heights, widths,
                                                     crop_plans.source_boxes(plans, heights, widths), flips, 64))
        difference = (got - expected).abs()
        if exact:
            assert difference.max().item() < 1e-4
        else:
            assert difference.mean().item() < 2 * LEVEL


@pytest.mark.parametrize("share", [0.0, 0.3, 1.0])
def test_the_gpu_producer_path_runs_on_a_cpu(imagenet_at_crop_side, share):
    """The GPU path's producer thread (decode list + gather, CPU share on the threads, ring of host
    buffers, hand-off queue), run without CUDA: the same batches as the CPU threads make."""
    images = rows_of(imagenet_at_crop_side, count=230)
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
def test_gpu_pipeline_matches_the_cpu_threads(imagenet_at_crop_side):
    images = rows_of(imagenet_at_crop_side, count=300)
    with fast(images) as cpu:
        expected, expected_labels = gather(cpu.epoch(seeded(8)))
    cuda = torch.device("cuda")
    for share, cache_gib in ((0.0, 0.0), (0.5, 0.0), (0.0, 1.0)):
        with FastLoader(images, 64, 64, cuda, workers=2, cache_gib=cache_gib, cpu_decode_share=share,
                        channels_last=True) as gpu:
            got, labels = gather(gpu.epoch(seeded(8)))
        assert got.is_cuda and torch.equal(labels.cpu(), expected_labels)
        assert (got.cpu() - expected).abs().max().item() < 1e-4
