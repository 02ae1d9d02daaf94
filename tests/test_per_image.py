"""Per-image scores: the metrics on resampled test sets against the logged metrics' own code
(``itl_ray.metrics``), with every weight 1 (exactly) and on explicit resampled lists."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from itl_ray import metrics
from itl_ray.datasets.voc import ACTION_CLASSES, VOC_CLASSES
from itl_ray.per_image import (SCHEMAS, ActionScores, DetectionScores, SceneScores, UnusableScores, load_task,
                               read_scores)


def detection_case(seed: int, images: int = 40):
    """Ground truth on a grid of disjoint cells and detections that either copy a box (IoU 1),
    duplicate one, sit on an empty cell (IoU 0) or copy a difficult box; the tp/fp flags follow
    the devkit's greedy matching in score order (equal scores in list order)."""
    rng = np.random.default_rng(seed)
    classes = VOC_CLASSES[:5]
    ground_truth = {name: {} for name in classes}
    detections = {name: [] for name in classes}
    positive_rows, detection_rows = [], []
    for index in range(images):
        image = f"{index:06d}"
        cells = iter(rng.permutation(25))
        for name in classes:
            objects = []
            for _ in range(rng.integers(0, 3)):
                cell = next(cells)
                box = (float(cell % 5 * 20 + 1), float(cell // 5 * 20 + 1), float(cell % 5 * 20 + 10), float(cell // 5 * 20 + 10))
                objects.append((box, bool(rng.random() < 0.15)))
            ground_truth[name][image] = objects
            positive_rows.append((image, name, sum(not difficult for _, difficult in objects)))
            for box, _ in objects:
                for _ in range(rng.choice([0, 1, 1, 2])):  # missed, found, found twice
                    detections[name].append((image, round(float(rng.random()), 2), box))
            for _ in range(rng.integers(0, 3)):  # false alarms on empty cells
                cell = next(cells)
                box = (float(cell % 5 * 20 + 1), float(cell // 5 * 20 + 1), float(cell % 5 * 20 + 10), float(cell // 5 * 20 + 10))
                detections[name].append((image, round(float(rng.random()), 2), box))
    for name in classes:
        found = set()
        flags = {}
        scores = np.array([score for _, score, _ in detections[name]])
        for position in np.argsort(-scores, kind="stable"):
            image, _, box = detections[name][position]
            match = [(i, difficult) for i, (gt, difficult) in enumerate(ground_truth[name][image]) if gt == box]
            if not match:
                flags[position] = (False, True)
            elif match[0][1]:
                flags[position] = (False, False)
            elif (image, match[0][0]) in found:
                flags[position] = (False, True)
            else:
                found.add((image, match[0][0]))
                flags[position] = (True, False)
        for position, (image, score, _) in enumerate(detections[name]):
            detection_rows.append((image, name, score, *flags[position]))
    detections_frame = pd.DataFrame(detection_rows, columns=["image_id", "class", "score", "tp", "fp"])
    positives_frame = pd.DataFrame(positive_rows, columns=["image_id", "class", "positives"])
    logged = 100 * metrics.mean_ap(metrics.detection_ap(detections[name], ground_truth[name]) for name in classes)
    return detections_frame, positives_frame, logged


def action_case(seed: int, images: int = 30):
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(images):
        for person in range(int(rng.integers(1, 3))):
            for action in ACTION_CLASSES[:4]:
                rows.append((f"{index:06d}", person, action, round(float(rng.random()), 2), int(rng.random() < 0.3)))
    frame = pd.DataFrame(rows, columns=["image_id", "person", "action", "score", "label"])
    logged = 100 * metrics.mean_ap(
        metrics.average_precision(frame[frame.action == a].score.to_numpy(), frame[frame.action == a].label.to_numpy(),
                                  eleven_point=False)
        for a in ACTION_CLASSES[:4])
    return frame, logged


def scene_case(seed: int, images: int = 60):
    rng = np.random.default_rng(seed)
    scenes = ["/b/beach", "/a/abbey", "/k/kitchen", "/o/office"]
    label = rng.choice(scenes, images)
    prediction = np.where(rng.random(images) < 0.6, label, rng.choice(scenes, images))
    frame = pd.DataFrame({"image_id": [f"{i:06d}" for i in rng.permutation(images)], "label": label,
                          "prediction": prediction})
    index = {name: i for i, name in enumerate(sorted(scenes))}
    logged = 100 * metrics.mean_per_class_accuracy(frame.prediction.map(index).to_numpy(),
                                                   frame.label.map(index).to_numpy())
    return frame, logged


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_of_one_reproduce_the_logged_metrics_exactly(seed):
    detections, positives, logged = detection_case(seed)
    scores = DetectionScores(detections, positives)
    assert scores.metric(np.ones((1, len(scores.images))))[0] == logged
    actions, logged = action_case(seed)
    scores = ActionScores(actions)
    assert scores.metric(np.ones((1, len(scores.images))))[0] == logged
    scenes, logged = scene_case(seed)
    scores = SceneScores(scenes)
    assert scores.metric(np.ones((1, len(scores.images))))[0] == logged


def expand(frame: pd.DataFrame, images: tuple[str, ...], weights: np.ndarray) -> pd.DataFrame:
    """The explicit resampled list: each row repeated in place once per draw of its image, each
    copy of an image renamed, so the logged metrics' code sees a plain test set."""
    multiplicity = dict(zip(images, weights.astype(int)))
    rows = []
    for row in frame.itertuples(index=False):
        for copy in range(multiplicity[row.image_id]):
            rows.append(row._replace(image_id=f"{row.image_id}#{copy}"))
    return pd.DataFrame(rows, columns=frame.columns)


@pytest.mark.parametrize("seed", [3, 4])
def test_resampled_metrics_equal_a_brute_force_recomputation(seed):
    rng = np.random.default_rng(seed)
    detections, positives, _ = detection_case(seed)
    detection = DetectionScores(detections, positives)
    actions, _ = action_case(seed)
    action = ActionScores(actions)
    scenes, _ = scene_case(seed)
    scene = SceneScores(scenes)
    for task in (detection, action, scene):
        count = len(task.images)
        weights = rng.multinomial(count, np.full(count, 1 / count), size=3).astype(float)
        values = task.metric(weights)
        for row, value in zip(weights, values):
            if task is detection:
                expanded = expand(detections, task.images, row)
                expected_task = DetectionScores(expanded, expand(positives, task.images, row))
            elif task is action:
                expected_task = ActionScores(expand(actions, task.images, row))
            else:
                expected_task = SceneScores(expand(scenes, task.images, row))
            expected = expected_task.metric(np.ones((1, len(expected_task.images))))[0]
            assert value == pytest.approx(expected, abs=1e-9)


def test_brute_force_detection_recomputation_uses_the_metric_code(tmp_path):
    """The expanded detection list scored by ``metrics`` itself (not by this module) agrees too."""
    detections, positives, _ = detection_case(7, images=25)
    task = DetectionScores(detections, positives)
    rng = np.random.default_rng(7)
    weights = rng.multinomial(len(task.images), np.full(len(task.images), 1 / len(task.images)), size=1)[0]
    expanded = expand(detections, task.images, weights)
    expanded_positives = expand(positives, task.images, weights)
    aps = []
    for name in task.classes:
        mine = expanded[expanded["class"] == name]
        ranked = np.argsort(-mine.score.to_numpy(), kind="stable")
        is_true, is_false = mine.tp.to_numpy()[ranked], mine.fp.to_numpy()[ranked]
        count = int(expanded_positives[expanded_positives["class"] == name].positives.sum())
        if count == 0:
            aps.append(float("nan"))
            continue
        tp, fp = np.cumsum(is_true, dtype=float), np.cumsum(is_false, dtype=float)
        precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
        aps.append(metrics.voc07_ap(tp / count, precision))
    assert task.metric(weights[None].astype(float))[0] == pytest.approx(100 * metrics.mean_ap(aps), abs=1e-9)


def test_a_class_without_positives_in_a_resample_is_left_out():
    actions, _ = action_case(5, images=12)
    task = ActionScores(actions)
    # Only the first image drawn: actions whose positives are all elsewhere have no AP there.
    weights = np.zeros((1, len(task.images)))
    weights[0, 0] = len(task.images)
    value = task.metric(weights)[0]
    first = actions[actions.image_id == task.images[0]]
    with_positive = [a for a in ACTION_CLASSES[:4] if first[first.action == a].label.sum() > 0]
    expected = [metrics.average_precision(first[first.action == a].score, first[first.action == a].label,
                                          eleven_point=False) for a in with_positive]
    if expected:
        assert value == pytest.approx(100 * np.mean(expected))
    else:
        assert np.isnan(value)


def test_the_recall_levels_are_the_metrics_own():
    from itl_ray import per_image

    assert per_image.ELEVEN_RECALL_LEVELS == metrics.ELEVEN_POINT_LEVELS["devkit"]


def write(tmp_path, name: str, frame: pd.DataFrame, schema: dict | None = None):
    table = pa.Table.from_pandas(frame, preserve_index=False)
    if schema:
        table = table.cast(pa.schema([(column, schema[column]) for column in frame.columns]))
    path = tmp_path / name
    pq.write_table(table, path)
    return path


def test_files_are_checked_against_the_schema(tmp_path):
    scenes, logged = scene_case(0)
    write(tmp_path, "sun397_predictions.parquet", scenes, SCHEMAS["sun397_predictions.parquet"])
    task = load_task("sun397_acc", tmp_path)
    assert task.metric(np.ones((1, len(task.images))))[0] == logged

    with pytest.raises(UnusableScores, match="per_image/voc12_act_scores.parquet is missing"):
        load_task("voc12_act_map", tmp_path)
    write(tmp_path, "sun397_predictions.parquet", scenes.drop(columns=["prediction"]))
    with pytest.raises(UnusableScores, match="has no column 'prediction'"):
        read_scores(tmp_path / "sun397_predictions.parquet")
    actions, _ = action_case(0)
    write(tmp_path, "voc12_act_scores.parquet", actions.assign(score=actions.score.astype("float32")))
    with pytest.raises(UnusableScores, match="column 'score' is float, expected double"):
        read_scores(tmp_path / "voc12_act_scores.parquet")
    (tmp_path / "voc07_det_positives.parquet").write_text("not parquet")
    with pytest.raises(UnusableScores, match="not a readable Parquet file"):
        read_scores(tmp_path / "voc07_det_positives.parquet")
