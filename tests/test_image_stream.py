"""The transfer stages' image reader: Fast R-CNN's scale rule, images back in plan order, decoded,
scaled and flipped, never more than ``ahead`` waiting, decode errors raised with the image's name."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from PIL import Image

from itl_ray.datasets.voc import VocImage, VocSplit
from itl_ray.errors import UserError
from itl_ray.images import resize_uint8
from itl_ray.transfer.image_stream import ImageStream, fast_rcnn_scale, scaled_size


def png(pixels: torch.Tensor) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(out, format="PNG")
    return out.getvalue()


def split_of(count: int, height: int = 30, width: int = 40) -> tuple[VocSplit, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    pixels = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator) for _ in range(count)]
    images = tuple(VocImage(f"{index:04d}", f"row {index}", width, height, (), png(image))
                   for index, image in enumerate(pixels))
    return VocSplit("test split", images), pixels


def test_fast_rcnn_scale_rule():
    # VOC's usual 500 x 375: the shorter side goes to 600 (x1.6), the longer to 800.
    assert fast_rcnn_scale(375, 500, 600, 1000) == 1.6
    assert scaled_size(375, 500, 1.6) == (600, 800)
    # A long image: 600 / 200 = 3 would make the longer side 1500 > 1000, so that side goes to 1000.
    assert fast_rcnn_scale(200, 500, 600, 1000) == 2.0
    assert scaled_size(200, 500, 2.0) == (400, 1000)
    # The cap applies to the rounded side (blob.py: np.round(im_scale * im_size_max) > max_size):
    # 600 / 360 * 600.4 = 1000.67 rounds to 1001 > 1000; 600 / 360 * 600.2 = 1000.33 rounds to 1000.
    assert fast_rcnn_scale(360, 600.4, 600, 1000) == 1000 / 600.4
    assert fast_rcnn_scale(360, 600.2, 600, 1000) == 600 / 360


def test_images_come_back_in_plan_order_scaled_and_flipped():
    split, pixels = split_of(5)
    plan = [(3, False), (0, True), (3, True), (4, False)]
    with ImageStream(split, size=60, max_size=1000, workers=2, ahead=2) as stream:
        out = list(stream.images(plan))
    assert [(image.index, image.flipped) for image in out] == plan
    for image, (index, flip) in zip(out, plan):
        assert image.scale == 2.0 and image.pixels.shape == (3, 60, 80) and image.pixels.dtype == torch.uint8
        expected = resize_uint8(pixels[index], 60, 80)
        assert torch.equal(image.pixels, expected.flip(-1) if flip else expected)


def test_at_most_ahead_images_wait_and_the_plan_is_read_lazily():
    split, _ = split_of(40)
    taken = []
    read = []

    def plan():
        for index in range(40):
            read.append(index)
            # The plan is never read more than `ahead` items beyond what was taken.
            assert len(read) - len(taken) <= 3
            yield index, False

    with ImageStream(split, size=30, max_size=1000, workers=3, ahead=3) as stream:
        for image in stream.images(plan()):
            taken.append(image.index)
    assert taken == list(range(40))
    assert stream.peak_waiting == 3 and stream.decoded == 40


def test_a_worker_decodes_while_the_consumer_holds_an_image():
    # A barrier the test controls: the consumer holds image 0 until the worker has started on a
    # later image, so decoding really runs beside the consumer (no timing assumed).
    split, _ = split_of(6)
    started = threading.Event()
    original = split.encoded

    def encoded(index):
        if index > 0:
            started.set()
        return original(index)

    object.__setattr__(split, "encoded", encoded)
    with ImageStream(split, size=30, max_size=1000, workers=1, ahead=2) as stream:
        images = stream.images((index, False) for index in range(6))
        first = next(images)
        assert started.wait(timeout=60)
        assert first.index == 0 and [image.index for image in images] == [1, 2, 3, 4, 5]


def test_an_undecodable_image_is_a_user_error_naming_it():
    split, _ = split_of(3)
    broken = tuple(image if index != 1 else VocImage(image.image_id, image.path, image.width, image.height, (),
                                                        b"not an image")
                   for index, image in enumerate(split.images))
    with ImageStream(VocSplit("voc2007 test", broken), 30, 1000, workers=1, ahead=2) as stream:
        with pytest.raises(UserError, match="0001 of voc2007 test"):
            list(stream.images((index, False) for index in range(3)))


def test_a_size_other_than_the_manifest_says_is_a_user_error():
    split, _ = split_of(1)
    wrong = (VocImage("0000", "row 0", 41, 30, (), split.images[0].jpeg),)
    with ImageStream(VocSplit("voc2007 test", wrong), 30, 1000, workers=1, ahead=1) as stream:
        with pytest.raises(UserError, match="40x30 px, but its manifest says 41x30"):
            list(stream.images([(0, False)]))
