"""The transfer tasks' metrics: PASCAL VOC average precision, mean AP, accuracy, box IoU, and the
names of a trial's headline metrics (``FINAL_METRICS``).

Every function returns a fraction in 0..1 (or NaN where the metric is undefined, see each
docstring); callers multiply by 100 to report percent, as the study does.

Average precision follows the PASCAL VOC development kit:
- ``voc07_ap``: the VOC 2007 metric, the mean of the interpolated precision at the eleven recall
  levels 0, 0.1, ..., 1 (the study's PASCAL-DET numbers use it).
- ``voc_area_ap``: the VOC 2010+ metric, the area under the monotone precision envelope.
- ``detection_ap``: the devkit's detection protocol for one class (greedy matching at IoU >= 0.5,
  ``difficult`` objects ignored, duplicates false positives).

The eleven recall levels. VOC 2007's AP averages the precision at recall levels written
``0:0.1:1`` in the devkit (``VOCevaldet.m``: ``for t=0:0.1:1; p=max(prec(rec>=t)); ...``), and a
recall landing exactly on 0.3, 0.6 or 0.7 reaches the level or not depending on how the level was
computed in floating point. ``ELEVEN_POINT_LEVELS`` holds three versions; ``levels=`` chooses:

- ``"devkit"`` (the default): the values MATLAB's colon operator gives for ``0:0.1:1``, the
  official devkit that Fast R-CNN's released code called (``lib/datasets/pascal_voc.py``,
  ``_do_matlab_eval``) and so the study's kind of numbers. MATLAB builds a colon vector from both
  ends to keep rounding symmetric: the first half as ``a + k*d``, the second half as
  ``b - (n-k)*d``, the middle of an even count as ``(a+b)/2`` (MathWorks, ``colonop.m``, quoted in
  MATLAB Answers "How does the COLON operator work?", 2012, whose example ``0:0.1:0.3`` against
  ``0:0.1:0.4`` differing by -2.776e-17 and -5.551e-17 this construction reproduces exactly;
  assumed: the devkit's ``for`` loop over ``0:0.1:1`` takes the values that vector holds). So
  0.3 is ``3*0.1`` = 0.30000000000000004 (above 0.3), while 0.6 and 0.7 are ``1-4*0.1`` and
  ``1-3*0.1``, exactly the doubles nearest 0.6 and 0.7. ``matlab_colon`` computes them.
- ``"voc_eval"``: py-faster-rcnn's ``lib/datasets/voc_eval.py`` (``np.arange(0., 1.1, 0.1)``):
  0.30000000000000004, 0.6000000000000001 and 0.7000000000000001, all above the decimal value.
  (GNU Octave's ranges, ``base + k*increment``, give the same.)
- ``"exact"``: the doubles nearest k/10.

One image, 5 objects, 3 detections exactly on 3 of them (recall 0.6, precision 1): devkit 7/11,
voc_eval 6/11, exact 7/11. Three of ten objects found (recall 0.3): devkit and voc_eval 3/11,
exact 4/11. Whenever no recall lands exactly on a level all three agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where boxes are compared, so the report's AP needs none of it
    import torch

# A box in VOC pixel coordinates: (xmin, ymin, xmax, ymax), both corners inclusive.
Box = tuple[float, float, float, float]
# A detection of one class: (image_id, score, box).
Detection = tuple[str, float, Box]
# A ground-truth object of that class: (box, difficult).
GroundTruthObject = tuple[Box, bool]

# The headline metrics of a trial, in percent: ImageNet top-1 of the pretrained network on its own
# label set, VOC 2007 detection mAP, VOC 2012 action mAP, SUN397 scene accuracy (the study's four
# numbers; names in DESIGN.md's MLflow contract).
FINAL_METRICS = ("pretrain_top1", "voc07_det_map", "voc12_act_map", "sun397_acc")
# Per-class metrics, in percent: f"{DETECTION_AP}/<VOC class>" and f"{ACTION_AP}/<action>" (MLflow
# groups a chart per prefix).
DETECTION_AP = "voc07_det_ap"
ACTION_AP = "voc12_act_ap"
# Induction accuracy (transfer/induction.py), in percent, where a trial runs it: nearest-neighbour
# top-1 and top-5 of the 1000 fine classes on fc7 features.
INDUCTION_METRICS = ("induction_top1", "induction_top5")



def matlab_colon(start: float, step: float, stop: float) -> tuple[float, ...]:
    """The values of MATLAB's ``start:step:stop`` for a positive ``step`` and a whole number of
    steps, built as MATLAB builds them (see the module docstring): ``start + k*step`` for the
    first half, ``stop - (n-k)*step`` for the second, ``(start+stop)/2`` in the middle of an even
    count ``n``."""
    count = round((stop - start) / step)
    values = []
    for k in range(count + 1):
        if 2 * k < count:
            values.append(start + k * step)
        elif 2 * k == count:
            values.append((start + stop) / 2)
        else:
            values.append(stop - (count - k) * step)
    return tuple(values)


# The eleven recall levels of the VOC 2007 metric, three ways (see the module docstring).
ELEVEN_POINT_LEVELS: dict[str, tuple[float, ...]] = {
    "devkit": matlab_colon(0.0, 0.1, 1.0),  # VOCevaldet.m's 0:0.1:1 in MATLAB
    "voc_eval": tuple(float(level) for level in np.arange(0.0, 1.1, 0.1)),  # py-faster-rcnn voc_eval.py
    "exact": tuple(level / 10 for level in range(11)),
}
DEFAULT_LEVELS = "devkit"


def _levels(levels: str) -> tuple[float, ...]:
    if levels not in ELEVEN_POINT_LEVELS:
        raise ValueError(f"levels must be one of {', '.join(ELEVEN_POINT_LEVELS)}, got {levels!r}")
    return ELEVEN_POINT_LEVELS[levels]


def _array(values, dtype) -> np.ndarray:
    """A 1-d numpy array from a list, a numpy array or a (possibly GPU) tensor."""
    if hasattr(values, "detach"):  # a torch tensor, possibly on a GPU
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype).reshape(-1)


def voc07_ap(recall, precision, levels: str = DEFAULT_LEVELS) -> float:
    """VOC 2007 11-point interpolated AP.

    ``recall`` and ``precision`` are the values after each entry of the ranking (recall
    non-decreasing). At each level t of ``ELEVEN_POINT_LEVELS[levels]`` (0, 0.1, ..., 1 as the
    official devkit computes them by default) the interpolated precision is the best precision
    reached at any recall >= t (0 when recall never reaches t); AP is their mean. ValueError for
    an unknown ``levels`` or lengths that differ.
    """
    recall = _array(recall, np.float64)
    precision = _array(precision, np.float64)
    if recall.shape != precision.shape:
        raise ValueError(f"recall has {recall.size} values, precision {precision.size}")
    points = _levels(levels)
    total = 0.0
    for level in points:
        reached = recall >= level
        total += float(precision[reached].max()) if reached.any() else 0.0
    return total / len(points)


def voc_area_ap(recall, precision) -> float:
    """VOC 2010+ AP: area under the precision envelope (precision made non-increasing in recall).

    As the devkit does, the curve starts at recall 0 and ends at recall 1 with precision 0, the
    envelope at each point is the best precision at that recall or beyond, and the area sums
    the envelope over the recall steps.
    """
    recall = _array(recall, np.float64)
    precision = _array(precision, np.float64)
    if recall.shape != precision.shape:
        raise ValueError(f"recall has {recall.size} values, precision {precision.size}")
    recall = np.concatenate(([0.0], recall, [1.0]))
    precision = np.concatenate(([0.0], precision, [0.0]))
    for index in range(len(precision) - 2, -1, -1):
        precision[index] = max(precision[index], precision[index + 1])
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def _ap_from_ranking(is_true: np.ndarray, is_false: np.ndarray, positives: int, eleven_point: bool,
                     levels: str = DEFAULT_LEVELS) -> float:
    """AP of a ranking already sorted best first, given which entries count as true / false
    positives (an entry that is neither is ignored) and the number of positives to find."""
    if positives == 0:
        return math.nan
    true_positives = np.cumsum(is_true, dtype=np.float64)
    false_positives = np.cumsum(is_false, dtype=np.float64)
    recall = true_positives / positives
    # The devkit divides by tp + fp with no guard: a leading run of ignored entries gives 0/0.
    # Those entries never change recall, so their precision only matters through the envelope;
    # counting it as 0 leaves every interpolated value unchanged.
    counted = true_positives + false_positives
    precision = np.divide(true_positives, counted, out=np.zeros_like(counted), where=counted > 0)
    return voc07_ap(recall, precision, levels) if eleven_point else voc_area_ap(recall, precision)


def _best_first(scores: np.ndarray) -> np.ndarray:
    """Indices that sort scores from highest to lowest; equal scores keep their input order
    (a stable sort, so results do not depend on the sorting algorithm)."""
    return np.argsort(-scores, kind="stable")


def average_precision(scores, labels, *, eleven_point: bool, ignore=None, levels: str = DEFAULT_LEVELS) -> float:
    """AP of a ranking: the entries sorted by ``scores`` (highest first), ``labels`` 1 for a
    positive and 0 for a negative.

    ``ignore`` (optional booleans, one per entry) marks entries that are neither positives nor
    negatives, like the devkit's "difficult" examples (label 0 in the VOC classification and
    action ground truth files): they do not change recall or precision. Returns NaN when there is
    no positive (AP is undefined); ``mean_ap`` skips such classes.
    """
    scores = _array(scores, np.float64)
    labels = _array(labels, np.int64)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 1 (positive) or 0 (negative); use ignore= to leave entries out")
    ignored = np.zeros(labels.shape, dtype=bool) if ignore is None else _array(ignore, bool)
    if ignored.shape != labels.shape:
        raise ValueError(f"{labels.size} labels but {ignored.size} ignore flags")
    order = _best_first(scores)
    labels, ignored = labels[order], ignored[order]
    is_true = (labels == 1) & ~ignored
    is_false = (labels == 0) & ~ignored
    return _ap_from_ranking(is_true, is_false, int(is_true.sum()), eleven_point, levels)


def box_iou(boxes: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU matrix (N x M, the dtype of the boxes) of boxes N x 4 and M x 4, each (x1, y1, x2, y2)
    with both corners inclusive: VOC's pixel convention, where a box from x1 to x2 is x2 - x1 + 1
    pixels wide (the devkit's VOCevaldet computes overlaps this way). Disjoint boxes give 0.

    ``torchvision.ops.box_iou`` measures a box as x2 - x1; the boxes are passed to it with one
    pixel added to x2 and y2."""
    import torchvision

    extent = boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
    return torchvision.ops.box_iou(boxes + extent, others + extent.to(others.dtype))


def match_detections(
    detections: Sequence[Detection],
    ground_truth: Mapping[str, Sequence[GroundTruthObject]],
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The PASCAL VOC devkit's matching of one class's detections (VOCevaldet): which are true and
    which false positives, and how many positives there are to find.

    ``detections``: (image_id, score, box) over all test images; ``ground_truth``: per image id,
    this class's objects as (box, difficult). Boxes are VOC pixel coordinates.

    Detections are taken from the highest score down (equal scores in input order). Each is
    compared with every object of its image and goes to the one it overlaps most (the first on
    ties). If that IoU is below ``iou_threshold`` it is a false positive; otherwise: a difficult
    object makes it neither true nor false positive (it is ignored), an object not yet detected
    makes it a true positive and marks the object, an object already detected makes it a false
    positive (a duplicate). As in the devkit, the best-overlapping object decides, even when
    another object it also overlaps enough is still free. A detection competes only with the
    detections of its own image, so the flags of an image do not depend on the other images.

    Returns ``(tp, fp, positives)``: two boolean arrays in the order of ``detections`` and the
    number of non-difficult objects."""
    import torch

    gt_boxes = {image_id: np.array([box for box, _ in objects], dtype=np.float64).reshape(-1, 4)
                for image_id, objects in ground_truth.items()}
    gt_difficult = {image_id: np.array([difficult for _, difficult in objects], dtype=bool)
                    for image_id, objects in ground_truth.items()}
    gt_detected = {image_id: np.zeros(len(objects), dtype=bool) for image_id, objects in ground_truth.items()}
    positives = int(sum((~flags).sum() for flags in gt_difficult.values()))

    scores = np.array([score for _, score, _ in detections], dtype=np.float64)
    is_true = np.zeros(len(detections), dtype=bool)
    is_false = np.zeros(len(detections), dtype=bool)
    for index in _best_first(scores):
        image_id, _, box = detections[index]
        boxes = gt_boxes.get(image_id)
        if boxes is None or len(boxes) == 0:
            is_false[index] = True
            continue
        overlaps = box_iou(torch.tensor([box], dtype=torch.float64), torch.from_numpy(boxes))[0].numpy()
        best = int(np.argmax(overlaps))
        if overlaps[best] < iou_threshold:
            is_false[index] = True
        elif gt_difficult[image_id][best]:
            pass  # neither a true nor a false positive
        elif not gt_detected[image_id][best]:
            is_true[index] = True
            gt_detected[image_id][best] = True
        else:
            is_false[index] = True  # a second detection of an object already found
    return is_true, is_false, positives


def ranked_detection_ap(scores, tp, fp, positives: int, eleven_point: bool = True,
                        levels: str = DEFAULT_LEVELS) -> float:
    """AP of detections already matched (``match_detections``): ranked by ``scores``, highest first
    (equal scores in input order), cumulative true and false positives against ``positives``
    objects; with ``eleven_point`` the VOC 2007 metric at the recall levels
    ``ELEVEN_POINT_LEVELS[levels]``, else the area AP. NaN when ``positives`` is 0."""
    scores = _array(scores, np.float64)
    tp, fp = _array(tp, bool), _array(fp, bool)
    if not scores.shape == tp.shape == fp.shape:
        raise ValueError(f"{scores.size} scores, {tp.size} tp and {fp.size} fp flags")
    order = _best_first(scores)
    return _ap_from_ranking(tp[order], fp[order], positives, eleven_point, levels)


def detection_ap(
    detections: Sequence[Detection],
    ground_truth: Mapping[str, Sequence[GroundTruthObject]],
    iou_threshold: float = 0.5,
    eleven_point: bool = True,
    levels: str = DEFAULT_LEVELS,
) -> float:
    """AP of one class's detections, the PASCAL VOC devkit's protocol (VOCevaldet): the detections
    matched by ``match_detections`` (see there), then ranked (``ranked_detection_ap``, at the
    recall levels ``ELEVEN_POINT_LEVELS[levels]``). Difficult objects do not count among the
    positives. Returns NaN when the class has no non-difficult object (AP is undefined).
    """
    tp, fp, positives = match_detections(detections, ground_truth, iou_threshold)
    scores = np.array([score for _, score, _ in detections], dtype=np.float64)
    return ranked_detection_ap(scores, tp, fp, positives, eleven_point, levels)


def mean_ap(aps: Iterable[float]) -> float:
    """Mean of per-class APs, skipping NaN (classes without positives, whose AP is undefined).
    NaN when no class has an AP. Callers that skip classes should say which."""
    defined = [float(ap) for ap in aps if not math.isnan(float(ap))]
    return sum(defined) / len(defined) if defined else math.nan


def _predictions_and_labels(predictions, labels) -> tuple[np.ndarray, np.ndarray]:
    """Class indices as two int64 arrays of one non-zero length (ValueError otherwise)."""
    predictions = _array(predictions, np.int64)
    labels = _array(labels, np.int64)
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.size} predictions but {labels.size} labels")
    if labels.size == 0:
        raise ValueError("accuracy of no examples is undefined")
    return predictions, labels


def accuracy(predictions, labels) -> float:
    """Fraction of predictions (class indices) equal to the labels. ValueError for different
    lengths or no examples."""
    predictions, labels = _predictions_and_labels(predictions, labels)
    return float((predictions == labels).mean())


def mean_per_class_accuracy(predictions, labels) -> float:
    """Mean over the classes present in ``labels`` of the fraction of that class predicted
    right (balanced accuracy): every class weighs the same however many examples it has.
    ValueError for different lengths or no examples."""
    predictions, labels = _predictions_and_labels(predictions, labels)
    per_class = [float((predictions[labels == label] == label).mean()) for label in np.unique(labels)]
    return sum(per_class) / len(per_class)
