"""Region proposals for detection: Selective Search boxes of one image, and their recall.

``itl-ray prepare voc2007`` runs ``selective_search_jpeg`` once per stored image (in worker
processes, one OpenCV thread each) and stores the boxes beside the image shards
(``shards.write_proposals``); the detection stage reads them with ``Prepared.proposals(row)``.

Which Selective Search. Fast R-CNN (Girshick 2015) trained and tested on precomputed Selective
Search boxes (``data/scripts/fetch_selective_search_data.sh``; ``lib/datasets/pascal_voc.py``
reads them): for VOC 2007 the "fast mode" boxes Uijlings et al. released, for later sets boxes
computed with R-CNN's ``selective_search/selective_search_boxes.m`` (Girshick, fast-rcnn GitHub
issue #26). That script's fast mode (Uijlings et al. 2013, IJCV, "Selective Search Fast") is:

- colour spaces HSV and Lab;
- Felzenszwalb-Huttenlocher segmentations with k = 50 and 100, ``minSize = k``, sigma 0.8;
- two grouping strategies: colour + texture + size + fill, and texture + size + fill;
- boxes ranked by a random number times their hierarchy level (the paper's "pseudo random
  sorting"), then boxes narrower or lower than 20 px dropped (``minBoxWidth = 20``) and
  duplicates removed;
- at most 2,000 boxes per image, the first in that order (Fast R-CNN ``lib/datasets/
  pascal_voc.py``, ``'top_k': 2000``, applied to Uijlings et al.'s boxes).

``selective_search`` builds that configuration from OpenCV's implementation
(``cv2.ximgproc.segmentation``: its images, graph segmentations and strategy objects), on the
image as stored. OpenCV's one-call ``switchToSelectiveSearchFast()`` is close but not the same: it
segments with k = 150, 300 and 450 and a fixed minimum segment size of 100 px.

Determinism. OpenCV draws the ranking's random numbers from the C library's ``rand()``, whose
state is process-wide: the same image would get other boxes depending on what the process did
before. ``selective_search`` seeds ``rand()`` (``srand``) with ``RAND_SEED`` before each image, so
an image's proposals depend on its pixels alone (the same in every worker, run and resume).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import asdict, dataclass

import numpy as np

from itl_ray.errors import UserError

RAND_SEED = 1  # the C library's own initial seed: an image gets the boxes a fresh process gives it
MAX_BOXES = 2000  # the most boxes an image keeps (Fast R-CNN's top_k); the proposals contract's bound

# Object size bins of the recall report: (name, lower bound, upper bound) on the ground-truth box's
# shorter side in stored pixels, lower inclusive, upper exclusive.
SIZE_BINS = (("<32", 0, 32), ("32-64", 32, 64), ("64-128", 64, 128), (">=128", 128, math.inf))
RECALL_IOU = 0.5  # a ground-truth box counts as found when a proposal overlaps it this much


@dataclass(frozen=True)
class ProposalSettings:
    """How Selective Search runs (part of a prepared VOC 2007 folder's identity). The defaults are
    R-CNN's fast mode as Fast R-CNN used it (see the module docstring); bounds beside each field."""

    ks: tuple[int, ...] = (50, 100)  # segmentation thresholds k (minSize = k); each 1..10000, 1 to 8 of them
    sigma: float = 0.8  # Gaussian smoothing before segmentation, px; 0 < sigma <= 10
    min_box_side: int = 20  # px; boxes narrower or lower are dropped (R-CNN minBoxWidth); 1..1000
    max_boxes: int = MAX_BOXES  # boxes kept per image, best first; 1..2000

    def validate(self) -> None:
        """Raise UserError naming the setting and its allowed values."""
        if not 1 <= len(self.ks) <= 8 or not all(isinstance(k, int) and 1 <= k <= 10000 for k in self.ks):
            raise UserError(f"proposal ks must be 1 to 8 whole numbers in 1..10000, got {list(self.ks)}")
        if not 0 < self.sigma <= 10:
            raise UserError(f"proposal sigma must be in (0, 10], got {self.sigma}")
        if not 1 <= self.min_box_side <= 1000:
            raise UserError(f"proposal min_box_side must be 1..1000 px, got {self.min_box_side}")
        if not 1 <= self.max_boxes <= MAX_BOXES:
            raise UserError(f"proposal max_boxes must be 1..{MAX_BOXES}, got {self.max_boxes}")

    def identity(self) -> dict:
        """The settings as plain JSON values (stored in plan.json and PREPARED.json)."""
        return {"method": "selective_search_fast", **asdict(self), "ks": list(self.ks)}


def _seed_c_rand() -> None:
    ctypes.CDLL(None).srand(RAND_SEED)


def selective_search(image_bgr: np.ndarray, settings: ProposalSettings = ProposalSettings()) -> np.ndarray:
    """Selective Search boxes of one image.

    ``image_bgr``: H x W x 3 uint8 in OpenCV's BGR order. Returns an int64 array (K, 4) of boxes
    (x1, y1, x2, y2): 0-based pixel indices with both corners inclusive (a box from x1 to x2 is
    x2 - x1 + 1 px wide), in Selective Search's order (best first), at most ``settings.max_boxes``,
    none narrower or lower than ``settings.min_box_side``, no two equal. K may be 0 (an image
    smaller than ``min_box_side``). Runs on the calling thread's OpenCV thread count (prepare's
    workers set it to 1)."""
    import cv2

    segmentation = cv2.ximgproc.segmentation
    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {image_bgr.shape} {image_bgr.dtype}")
    search = segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(image_bgr)
    search.addImage(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2HSV))
    search.addImage(cv2.cvtColor(image_bgr, cv2.COLOR_BGR2Lab))
    for k in settings.ks:
        search.addGraphSegmentation(segmentation.createGraphSegmentation(settings.sigma, float(k), int(k)))
    search.addStrategy(segmentation.createSelectiveSearchSegmentationStrategyMultiple(
        segmentation.createSelectiveSearchSegmentationStrategyColor(),
        segmentation.createSelectiveSearchSegmentationStrategyTexture(),
        segmentation.createSelectiveSearchSegmentationStrategySize(),
        segmentation.createSelectiveSearchSegmentationStrategyFill()))
    search.addStrategy(segmentation.createSelectiveSearchSegmentationStrategyMultiple(
        segmentation.createSelectiveSearchSegmentationStrategyTexture(),
        segmentation.createSelectiveSearchSegmentationStrategySize(),
        segmentation.createSelectiveSearchSegmentationStrategyFill()))
    _seed_c_rand()
    rects = np.asarray(search.process(), dtype=np.int64).reshape(-1, 4)  # (x, y, w, h), ranked
    return boxes_from_rects(rects, settings.min_box_side, settings.max_boxes)


def boxes_from_rects(rects: np.ndarray, min_side: int, max_boxes: int) -> np.ndarray:
    """OpenCV rectangles (x, y, w, h) in ranked order -> boxes (x1, y1, x2, y2), 0-based inclusive,
    int64 (K, 4): degenerate rectangles (w or h < 1), rectangles narrower or lower than
    ``min_side`` and repeats of an earlier box dropped, the order kept, the first ``max_boxes``."""
    rects = np.asarray(rects, dtype=np.int64).reshape(-1, 4)
    keep = (rects[:, 2] >= max(1, min_side)) & (rects[:, 3] >= max(1, min_side))
    rects = rects[keep]
    boxes = np.stack([rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2] - 1, rects[:, 1] + rects[:, 3] - 1], axis=1)
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)][:max_boxes]


def selective_search_jpeg(jpeg: bytes | np.ndarray, settings: ProposalSettings = ProposalSettings()) -> np.ndarray:
    """``selective_search`` of an encoded image (the stored JPEG's bytes). ValueError when the
    bytes do not decode."""
    import cv2

    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), flags)
    if image is None:
        raise ValueError("the stored image does not decode")
    return selective_search(image, settings)


def _short_sides(boxes: np.ndarray) -> np.ndarray:
    return np.minimum(boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1)


def best_overlaps(ground_truth: np.ndarray, proposals: np.ndarray) -> np.ndarray:
    """For each ground-truth box (G, 4), the best IoU any proposal (K, 4) reaches (0 when K is 0).
    Boxes are (x1, y1, x2, y2) with inclusive corners, IoU as ``metrics.box_iou`` measures it."""
    import torch

    from itl_ray.metrics import box_iou

    if len(ground_truth) == 0 or len(proposals) == 0:
        return np.zeros(len(ground_truth))
    overlaps = box_iou(torch.as_tensor(ground_truth, dtype=torch.float64),
                       torch.as_tensor(proposals, dtype=torch.float64))
    return overlaps.max(dim=1).values.numpy()


class RecallCounter:
    """Proposal recall over many images: ground-truth boxes found (best IoU >= ``RECALL_IOU``)
    overall and per ``SIZE_BINS`` bin, and the number of proposals per image."""

    def __init__(self) -> None:
        self.objects = {name: 0 for name, _, _ in SIZE_BINS}
        self.found = {name: 0 for name, _, _ in SIZE_BINS}
        self.boxes_per_image: list[int] = []

    def add(self, proposals: np.ndarray, ground_truth: np.ndarray) -> None:
        """One image: its proposals (K, 4) and the ground-truth boxes to find (G, 4), both in the
        stored image's 0-based inclusive pixels."""
        ground_truth = np.asarray(ground_truth, dtype=np.float64).reshape(-1, 4)
        self.boxes_per_image.append(len(proposals))
        found = best_overlaps(ground_truth, proposals) >= RECALL_IOU
        sides = _short_sides(ground_truth)
        for name, low, high in SIZE_BINS:
            in_bin = (sides >= low) & (sides < high)
            self.objects[name] += int(in_bin.sum())
            self.found[name] += int((found & in_bin).sum())

    def report(self) -> dict:
        """``{"images", "boxes_per_image": {"mean", "min", "max"}, "recall_iou_0.5": {"all": {"objects",
        "found", "recall"}, "<32": ..., "32-64": ..., "64-128": ..., ">=128": ...}}``; a recall is
        None where there is no object to find."""
        def entry(objects: int, found: int) -> dict:
            return {"objects": objects, "found": found, "recall": round(found / objects, 4) if objects else None}

        counts = self.boxes_per_image
        recall = {"all": entry(sum(self.objects.values()), sum(self.found.values()))}
        recall.update({name: entry(self.objects[name], self.found[name]) for name, _, _ in SIZE_BINS})
        return {"images": len(counts),
                "boxes_per_image": {"mean": round(float(np.mean(counts)), 1) if counts else None,
                                    "min": int(min(counts)) if counts else None,
                                    "max": int(max(counts)) if counts else None},
                f"recall_iou_{RECALL_IOU}": recall}
