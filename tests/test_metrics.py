"""VOC average precision, mean AP and accuracy, pinned against examples computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from itl_ray.metrics import (
    ELEVEN_POINT_LEVELS,
    accuracy,
    average_precision,
    box_iou,
    detection_ap,
    mean_ap,
    mean_per_class_accuracy,
    matlab_colon,
    voc07_ap,
    voc_area_ap,
)

# ---------------------------------------------------------------------------------------------
# The two AP definitions on a given precision / recall curve


def test_voc07_ap_by_hand():
    # Levels 0, .1, .2 reach precision 1; .3, .4 the best at recall >= .4 (2/3); .5 to .8 reach
    # .5; .9 and 1 are never reached.
    recall = [0.2, 0.4, 0.4, 0.8]
    precision = [1.0, 0.5, 2 / 3, 0.5]
    assert voc07_ap(recall, precision) == pytest.approx((3 * 1 + 2 * (2 / 3) + 4 * 0.5) / 11)


def test_voc_area_ap_by_hand():
    # Envelope: 1 up to recall .2, 2/3 up to .4, .5 up to .8, then nothing.
    recall = [0.2, 0.4, 0.4, 0.8]
    precision = [1.0, 0.5, 2 / 3, 0.5]
    assert voc_area_ap(recall, precision) == pytest.approx(0.2 * 1 + 0.2 * (2 / 3) + 0.4 * 0.5)


def test_perfect_curve_has_ap_one_both_ways():
    assert voc07_ap([0.5, 1.0], [1.0, 1.0]) == pytest.approx(1.0)
    assert voc_area_ap([0.5, 1.0], [1.0, 1.0]) == pytest.approx(1.0)


def test_eleven_point_levels_as_each_scorer_computes_them():
    """The official devkit's ``0:0.1:1`` as MATLAB's colon operator builds it (first half a + k*d,
    second half b - (n-k)*d, middle (a+b)/2: MathWorks' colonop.m as described in MATLAB Answers
    "How does the COLON operator work?", 2012); py-faster-rcnn's voc_eval.py np.arange(0., 1.1,
    0.1); and the doubles nearest k/10."""
    assert ELEVEN_POINT_LEVELS["devkit"] == (0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert ELEVEN_POINT_LEVELS["devkit"][6] == 1 - 4 * 0.1 == 0.6 and ELEVEN_POINT_LEVELS["devkit"][7] == 1 - 3 * 0.1
    assert ELEVEN_POINT_LEVELS["voc_eval"] == (0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6000000000000001,
                                               0.7000000000000001, 0.8, 0.9, 1.0)
    assert ELEVEN_POINT_LEVELS["exact"] == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    # The MATLAB Answers thread's own example: x = 0:0.1:0.3, y = 0:0.1:0.4, x - y(1:end-1) is
    # [0 0 -2.7756e-17 -5.5511e-17] in MATLAB; the symmetric construction gives exactly that.
    x, y = matlab_colon(0.0, 0.1, 0.3), matlab_colon(0.0, 0.1, 0.4)
    assert [a - b for a, b in zip(x, y)] == [0.0, 0.0, -2.7755575615628914e-17, -5.551115123125783e-17]


def test_voc07_recall_exactly_0_6_by_each_scorer():
    """One image, 5 objects, 3 detections exactly on 3 of them: recall 3/5 = 0.6 at precision 1.
    The devkit's level 0.6 is reached (7 levels: 7/11), voc_eval's 0.6000000000000001 is not
    (6/11), the exact 0.6 is (7/11)."""
    ground_truth = {"img": [((1 + 20 * i, 1, 10 + 20 * i, 10), False) for i in range(5)]}
    detections = [("img", 0.9 - i / 10, (1 + 20 * i, 1, 10 + 20 * i, 10)) for i in range(3)]
    assert detection_ap(detections, ground_truth) == 7 / 11  # the default: the official devkit
    assert detection_ap(detections, ground_truth, levels="devkit") == 7 / 11
    assert detection_ap(detections, ground_truth, levels="voc_eval") == 6 / 11
    assert detection_ap(detections, ground_truth, levels="exact") == 7 / 11


def test_voc07_recall_exactly_0_3_and_0_7_by_each_scorer():
    """3 of 10 positives found (recall 0.3): the devkit's and voc_eval's level 0.30000000000000004
    is above it (3/11), the exact 0.3 is not (4/11). 7 of 10 (recall 0.7): the devkit's level is
    the double nearest 0.7 (8/11), voc_eval's 0.7000000000000001 is not reached (7/11)."""
    assert voc07_ap([0.1, 0.2, 0.3], [1.0, 1.0, 1.0]) == 3 / 11  # the default: the official devkit
    for levels, expected in (("devkit", 3 / 11), ("voc_eval", 3 / 11), ("exact", 4 / 11)):
        assert voc07_ap([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], levels=levels) == expected
    recall = [k / 10 for k in range(1, 8)]
    for levels, expected in (("devkit", 8 / 11), ("voc_eval", 7 / 11), ("exact", 8 / 11)):
        assert voc07_ap(recall, [1.0] * 7, levels=levels) == expected
    with pytest.raises(ValueError, match="levels must be one of devkit, voc_eval, exact"):
        voc07_ap(recall, [1.0] * 7, levels="matlab")


def test_curves_must_have_equal_length():
    with pytest.raises(ValueError):
        voc07_ap([0.1, 0.2], [1.0])


# ---------------------------------------------------------------------------------------------
# Rankings


def test_ranking_ap_by_hand():
    # Best first: +, -, +, -, - with 2 positives. Recall .5 .5 1 1 1, precision 1 .5 2/3 .5 .4.
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    labels = [1, 0, 1, 0, 0]
    assert average_precision(scores, labels, eleven_point=True) == pytest.approx((6 * 1 + 5 * (2 / 3)) / 11)
    assert average_precision(scores, labels, eleven_point=False) == pytest.approx(0.5 * 1 + 0.5 * (2 / 3))


def test_ranking_is_sorted_by_score_not_input_order():
    scores = [0.5, 0.6, 0.7, 0.8, 0.9]
    labels = [0, 0, 1, 0, 1]  # the same ranking as above, given worst first
    assert average_precision(scores, labels, eleven_point=True) == pytest.approx((6 + 5 * (2 / 3)) / 11)


def test_ignored_entries_count_neither_way():
    scores = [0.9, 0.8, 0.7, 0.6]
    labels = [0, 1, 1, 0]
    # The top negative, as a counted entry: precision at full recall is 2/3 everywhere.
    assert average_precision(scores, labels, eleven_point=True) == pytest.approx(2 / 3)
    # Ignored, the two positives lead the ranking.
    ignore_top = [True, False, False, False]
    assert average_precision(scores, labels, eleven_point=True, ignore=ignore_top) == pytest.approx(1.0)
    # An ignored positive is not a positive to find either.
    assert average_precision([0.9, 0.8], [1, 1], eleven_point=True, ignore=[False, True]) == pytest.approx(1.0)


def test_equal_scores_keep_input_order():
    assert average_precision([0.5, 0.5], [0, 1], eleven_point=False) == pytest.approx(0.5)
    assert average_precision([0.5, 0.5], [1, 0], eleven_point=False) == pytest.approx(1.0)


def test_ranking_accepts_tensors():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([1, 0, 1, 0, 0])
    assert average_precision(scores, labels, eleven_point=True) == pytest.approx((6 + 5 * (2 / 3)) / 11)


def test_ranking_without_positives_is_nan():
    assert math.isnan(average_precision([0.3, 0.2], [0, 0], eleven_point=True))


def test_ranking_rejects_other_labels():
    with pytest.raises(ValueError, match="ignore"):
        average_precision([0.3, 0.2], [1, -1], eleven_point=True)


# ---------------------------------------------------------------------------------------------
# Detection AP (the devkit's protocol)


def box_iou_voc(box, others):
    """IoU of one box with each of ``others``, as a numpy array (as ``detection_ap`` uses it)."""
    return box_iou(torch.tensor([box], dtype=torch.float64), torch.tensor(others, dtype=torch.float64))[0].numpy()


def test_box_iou_uses_inclusive_pixel_corners():
    # 10x10 pixels vs its top 10x5 pixels: 50 / 100 (without the +1 it would be 36 / 81).
    assert box_iou_voc((1, 1, 10, 10), [[1, 1, 10, 5]])[0] == pytest.approx(0.5)
    assert box_iou_voc((1, 1, 10, 10), [[1, 1, 10, 10]])[0] == pytest.approx(1.0)
    # Touching at one pixel column overlaps by 10 pixels; one pixel apart does not overlap.
    assert box_iou_voc((1, 1, 10, 10), [[10, 1, 19, 10]])[0] == pytest.approx(10 / 190)
    assert box_iou_voc((1, 1, 10, 10), [[11, 1, 20, 10]])[0] == 0.0


def test_box_iou_matrix_uses_inclusive_pixel_corners():
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    others = torch.tensor([[0.0, 0.0, 9.0, 4.0], [10.0, 0.0, 19.0, 9.0], [0.0, 0.0, 9.0, 9.0]])
    assert box_iou(boxes, others).tolist() == [[0.5, 0.0, 1.0]]


def test_iou_exactly_at_the_threshold_is_a_match():
    ground_truth = {"a": [((1, 1, 10, 10), False)]}
    assert detection_ap([("a", 0.9, (1, 1, 10, 5))], ground_truth) == pytest.approx(1.0)  # IoU 0.5
    assert detection_ap([("a", 0.9, (1, 1, 10, 4))], ground_truth) == pytest.approx(0.0)  # IoU 0.4
    assert detection_ap([("a", 0.9, (1, 1, 10, 4))], ground_truth, iou_threshold=0.4) == pytest.approx(1.0)


def test_difficult_objects_are_neither_true_nor_false_positives():
    ground_truth = {"a": [((1, 1, 10, 10), False), ((21, 21, 30, 30), True)]}
    detections = [
        ("a", 0.95, (50, 50, 60, 60)),  # on nothing: false positive
        ("a", 0.90, (21, 21, 30, 30)),  # the difficult object: ignored
        ("a", 0.80, (1, 1, 10, 10)),  # true positive
        ("a", 0.70, (1, 1, 10, 10)),  # the same object again: false positive
    ]
    # Counted ranking: FP, TP, FP with one positive: recall reaches 1 at precision 1/2.
    assert detection_ap(detections, ground_truth) == pytest.approx(0.5)
    assert detection_ap(detections, ground_truth, eleven_point=False) == pytest.approx(0.5)
    # Were the difficult object a normal one, there would be 2 positives, found at ranks 2 and 3:
    # precision 2/3 at full recall, for every level.
    counted = {"a": [((1, 1, 10, 10), False), ((21, 21, 30, 30), False)]}
    assert detection_ap(detections, counted) == pytest.approx(2 / 3)


def test_duplicates_are_false_positives_even_over_another_free_object():
    # b overlaps a by 100 / 120; a second detection of a goes to a (its best match), already
    # taken, so it is a false positive although b is still free (the devkit's rule).
    ground_truth = {"img": [((1, 1, 10, 10), False), ((1, 1, 10, 12), False)]}
    detections = [("img", 0.9, (1, 1, 10, 10)), ("img", 0.8, (1, 1, 10, 10))]
    assert detection_ap(detections, ground_truth) == pytest.approx(6 / 11)
    # A detection that fits b best takes it.
    detections = [("img", 0.9, (1, 1, 10, 10)), ("img", 0.8, (1, 1, 10, 12))]
    assert detection_ap(detections, ground_truth) == pytest.approx(1.0)


def test_detections_in_images_without_objects_are_false_positives():
    ground_truth = {"a": [((1, 1, 10, 10), False)], "b": []}
    detections = [("b", 0.9, (1, 1, 10, 10)), ("c", 0.8, (1, 1, 10, 10)), ("a", 0.7, (1, 1, 10, 10))]
    assert detection_ap(detections, ground_truth) == pytest.approx(1 / 3)


def test_detection_recall_counts_missed_objects():
    # Three of ten objects found, all at precision 1: levels 0 to 0.2 by the devkit (its 0.3 level
    # is 0.30000000000000004), 0 to 0.3 with exact levels.
    ground_truth = {f"img{i}": [((1, 1, 10, 10), False)] for i in range(10)}
    detections = [(f"img{i}", 1.0 - i / 10, (1, 1, 10, 10)) for i in range(3)]
    assert detection_ap(detections, ground_truth) == pytest.approx(3 / 11)
    assert detection_ap(detections, ground_truth, levels="exact") == pytest.approx(4 / 11)
    assert detection_ap(detections, ground_truth, eleven_point=False) == pytest.approx(0.3)


def test_detection_ap_without_positives_is_nan():
    assert math.isnan(detection_ap([("a", 0.5, (1, 1, 5, 5))], {"a": [((1, 1, 5, 5), True)]}))
    assert math.isnan(detection_ap([], {"a": []}))


def test_no_detections_give_zero():
    assert detection_ap([], {"a": [((1, 1, 5, 5), False)]}) == 0.0


# ---------------------------------------------------------------------------------------------
# Mean AP and accuracy


def test_mean_ap_skips_undefined_classes():
    assert mean_ap([0.5, math.nan, 1.0]) == pytest.approx(0.75)
    assert math.isnan(mean_ap([math.nan]))
    assert math.isnan(mean_ap([]))


def test_accuracy_and_mean_per_class_accuracy():
    predictions = [0, 1, 2, 2]
    labels = [0, 1, 1, 2]
    assert accuracy(predictions, labels) == pytest.approx(0.75)
    # Class 0: 1/1, class 1: 1/2, class 2: 1/1.
    assert mean_per_class_accuracy(predictions, labels) == pytest.approx((1 + 0.5 + 1) / 3)
    assert accuracy(torch.tensor(predictions), torch.tensor(labels)) == pytest.approx(0.75)


def test_accuracy_rejects_mismatched_or_empty_input():
    with pytest.raises(ValueError):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError):
        mean_per_class_accuracy([], [])
