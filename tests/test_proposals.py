"""Selective Search proposals: OpenCV's rectangles as VOC-style boxes, the objects of a simple image
found, the same boxes for the same image whatever ran before, and recall counted by object size."""

from __future__ import annotations

import numpy as np
import pytest

from itl_ray.errors import UserError
from itl_ray.proposals import (MAX_BOXES, ProposalSettings, RecallCounter, boxes_from_rects, selective_search,
                               selective_search_jpeg)


def test_rectangles_become_inclusive_boxes_in_order_without_repeats():
    rects = np.array([[10, 20, 30, 40],  # x, y, w, h -> (10, 20, 39, 59)
                      [0, 0, 5, 50],  # narrower than 20 px: dropped
                      [3, 4, 20, 20],  # exactly 20 px: kept
                      [10, 20, 30, 40],  # a repeat: dropped, the first stays first
                      [7, 7, 0, 30],  # degenerate
                      [1, 2, 25, 21]])
    assert boxes_from_rects(rects, min_side=20, max_boxes=10).tolist() == [
        [10, 20, 39, 59], [3, 4, 22, 23], [1, 2, 25, 22]]
    assert boxes_from_rects(rects, min_side=20, max_boxes=2).tolist() == [[10, 20, 39, 59], [3, 4, 22, 23]]
    assert boxes_from_rects(rects, min_side=1, max_boxes=10).tolist() == [
        [10, 20, 39, 59], [0, 0, 4, 49], [3, 4, 22, 23], [1, 2, 25, 22]]
    assert boxes_from_rects(np.zeros((0, 4)), 20, 10).shape == (0, 4)


def scene(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 300 x 200 BGR image: a smooth, noisy background and three flat objects; their boxes
    (x1, y1, x2, y2, inclusive)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:200, 0:300]
    image = np.stack([90 + 40 * np.sin(xs / 50 + c) + 20 * np.cos(ys / 40) for c in range(3)], axis=-1)
    image = image + rng.normal(0, 3, image.shape)
    boxes = np.array([[20, 30, 99, 129], [150, 20, 189, 59], [200, 110, 279, 179]])
    for (x1, y1, x2, y2), colour in zip(boxes, ([20, 20, 230], [230, 40, 40], [40, 220, 40])):
        image[y1 : y2 + 1, x1 : x2 + 1] = colour
    return image.clip(0, 255).astype(np.uint8), boxes


def test_the_objects_of_a_simple_image_are_found():
    image, objects = scene(0)
    boxes = selective_search(image)
    assert boxes.dtype == np.int64 and boxes.ndim == 2 and boxes.shape[1] == 4 and 0 < len(boxes) <= MAX_BOXES
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] < 300).all() and (boxes[:, 3] < 200).all()
    assert (boxes[:, 2:] - boxes[:, :2] + 1 >= 20).all()  # R-CNN's minimum box side
    assert len(np.unique(boxes, axis=0)) == len(boxes)
    counter = RecallCounter()
    counter.add(boxes, objects)
    assert counter.report()["recall_iou_0.5"]["all"] == {"objects": 3, "found": 3, "recall": 1.0}


def test_the_same_image_gets_the_same_boxes_whatever_ran_before():
    """OpenCV ranks with the C library's rand(); without reseeding, the second run differs."""
    first, other = scene(1)[0], scene(2)[0]
    boxes = selective_search(first)
    selective_search(other)
    assert np.array_equal(selective_search(first), boxes)
    small = ProposalSettings(max_boxes=5)
    assert np.array_equal(selective_search(first, small), boxes[:5])  # the top of the same ranking


def test_jpeg_bytes_are_decoded_and_garbage_refused():
    import cv2

    image, _ = scene(3)
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    boxes = selective_search_jpeg(encoded.tobytes())
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    assert np.array_equal(boxes, selective_search(decoded))
    with pytest.raises(ValueError, match="does not decode"):
        selective_search_jpeg(b"not a jpeg")


def test_recall_by_object_size():
    counter = RecallCounter()
    proposals = np.array([[0, 0, 19, 19], [100, 100, 199, 199]])
    objects = np.array([[0, 0, 19, 19],  # 20 px, found exactly
                        [0, 0, 39, 39],  # 40 px, IoU 400/1600 = 0.25: missed
                        [100, 100, 199, 199],  # 100 px, found
                        [100, 100, 239, 199]])  # 100 px short side, IoU 10000/14000 = 0.71: found
    counter.add(proposals, objects)
    counter.add(np.zeros((0, 4)), np.array([[0, 0, 299, 199]]))  # no proposals: a 200 px object missed
    report = counter.report()
    assert report["images"] == 2 and report["boxes_per_image"] == {"mean": 1.0, "min": 0, "max": 2}
    recall = report["recall_iou_0.5"]
    assert recall["all"] == {"objects": 5, "found": 3, "recall": 0.6}
    assert recall["<32"] == {"objects": 1, "found": 1, "recall": 1.0}
    assert recall["32-64"] == {"objects": 1, "found": 0, "recall": 0.0}
    assert recall["64-128"] == {"objects": 2, "found": 2, "recall": 1.0}
    assert recall[">=128"] == {"objects": 1, "found": 0, "recall": 0.0}
    assert RecallCounter().report()["recall_iou_0.5"]["all"]["recall"] is None


@pytest.mark.parametrize("settings, message", [
    (ProposalSettings(ks=()), "ks must be 1 to 8"), (ProposalSettings(ks=(0,)), "ks must be"),
    (ProposalSettings(sigma=0), "sigma"), (ProposalSettings(min_box_side=0), "min_box_side"),
    (ProposalSettings(max_boxes=2001), "max_boxes must be 1..2000"),
])
def test_settings_out_of_bounds_are_refused(settings, message):
    with pytest.raises(UserError, match=message):
        settings.validate()
    ProposalSettings().validate()
