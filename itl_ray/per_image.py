"""Per-image test scores of a trial, and its transfer metrics recomputed on resampled test sets.

Each transfer stage leaves its per-image scores as Parquet files under ``per_image/`` (a trial
artifact in MLflow). Their columns are a contract (``SCHEMAS``):

- ``voc07_det_detections.parquet``: one row per detection kept at test time: ``image_id``,
  ``class`` (a VOC class), ``score``, ``tp`` (matched to a not-yet-matched non-difficult
  ground-truth box at IoU >= 0.5), ``fp`` (neither tp nor matched to a difficult box). Matching is
  per image, so resampling images does not change it.
- ``voc07_det_positives.parquet``: one row per (test image, VOC class), every test image, also
  those without objects: ``image_id``, ``class``, ``positives`` (non-difficult boxes).
- ``voc12_act_scores.parquet``: one row per (person, action): ``image_id``, ``person``,
  ``action``, ``score``, ``label`` (1: the person does the action).
- ``sun397_predictions.parquet``: one row per test image: ``image_id``, ``label``, ``prediction``.

A resample is a multiset of the test images, given as a weight per image (its multiplicity). A
metric on a resample counts every row with its image's weight: AP ranks the rows by score
(equal scores in file order), accumulates weighted true and false positives, and takes the
positives as a weighted sum. The definitions are the logged metrics' own
(``itl_ray.metrics``): VOC 2007 11-point AP averaged over classes for detection, VOC 2012
area AP averaged over actions, mean per-scene accuracy for SUN397. With every weight 1 each
function returns exactly the metric the trial logged. Classes (actions, scenes) without a
positive (a test example) in a resample have no AP (accuracy) there and are left out of its mean,
as they are in the logged metric.

Speed: every resample's weighted counts come from one sparse matrix product per class (the false
positives between consecutive true positives are summed per image), so a real VOC 2007 test set
(4,952 images, up to 100 detections each) costs about one multiply-add per detection and
resample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse

from itl_ray.datasets.voc import ACTION_CLASSES, VOC_CLASSES
from itl_ray.metrics import DEFAULT_LEVELS, ELEVEN_POINT_LEVELS

# The VOC 2007 metric's recall levels, those the detection stage scores with by default (the
# official devkit's; see ``itl_ray.metrics``).
ELEVEN_RECALL_LEVELS = ELEVEN_POINT_LEVELS[DEFAULT_LEVELS]

FOLDER = "per_image"  # in the trial's working folder and among its MLflow artifacts

SCHEMAS: dict[str, dict[str, pa.DataType]] = {
    "voc07_det_detections.parquet": {"image_id": pa.string(), "class": pa.string(), "score": pa.float64(),
                                     "tp": pa.bool_(), "fp": pa.bool_()},
    "voc07_det_positives.parquet": {"image_id": pa.string(), "class": pa.string(), "positives": pa.int64()},
    "voc12_act_scores.parquet": {"image_id": pa.string(), "person": pa.int64(), "action": pa.string(),
                                 "score": pa.float64(), "label": pa.int64()},
    "sun397_predictions.parquet": {"image_id": pa.string(), "label": pa.string(), "prediction": pa.string()},
}

# The files each metric is recomputed from.
METRIC_FILES: dict[str, tuple[str, ...]] = {
    "voc07_det_map": ("voc07_det_detections.parquet", "voc07_det_positives.parquet"),
    "voc12_act_map": ("voc12_act_scores.parquet",),
    "sun397_acc": ("sun397_predictions.parquet",),
}


class UnusableScores(ValueError):
    """Per-image scores that are missing or do not follow the schema; the message says which and why."""


def read_scores(path: str | Path) -> pd.DataFrame:
    """One per-image Parquet file, checked against its schema (``SCHEMAS``, by file name)."""
    path = Path(path)
    expected = SCHEMAS.get(path.name)
    if expected is None:
        raise UnusableScores(f"{path.name}: not a per-image scores file (known: {', '.join(SCHEMAS)})")
    if not path.is_file():
        raise UnusableScores(f"{FOLDER}/{path.name} is missing")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise UnusableScores(f"{FOLDER}/{path.name} is not a readable Parquet file ({error})") from None
    for column, kind in expected.items():
        if column not in table.column_names:
            raise UnusableScores(f"{FOLDER}/{path.name} has no column {column!r}")
        actual = table.schema.field(column).type
        if actual != kind and not (pa.types.is_large_string(actual) and kind == pa.string()):
            raise UnusableScores(f"{FOLDER}/{path.name}: column {column!r} is {actual}, expected {kind}")
        if table.column(column).null_count:
            raise UnusableScores(f"{FOLDER}/{path.name}: column {column!r} has missing values")
    return table.select(list(expected)).to_pandas()


def _ordered(names: list[str], known: tuple[str, ...]) -> list[str]:
    """Names in the order the logged metric averages them: the task's class order, others sorted after."""
    present = set(names)
    return [name for name in known if name in present] + sorted(present - set(known))


def _sequential_sum(columns) -> np.ndarray:
    """Sum of equally shaped arrays in the given order (the order Python's ``sum`` adds a list in),
    so that a resample with weights 1 reproduces the logged metric bit for bit."""
    total = None
    for column in columns:
        total = column.copy() if total is None else total + column
    return total


@dataclass(frozen=True)
class _Rankings:
    """Every class's rows best first, reduced to what AP needs on any resample: the image of each
    true positive (the classes' true positives one after another, class c's in rows
    ``starts[c]:starts[c] + lengths[c]``), and a sparse (true positives x images) count of the
    false positives ranked between the previous true positive of the class and this one."""

    tp_images: np.ndarray  # (K,) image index of each true positive
    fp_before: scipy.sparse.csr_matrix  # (K, N) false positives of image i ranked just before tp k
    starts: np.ndarray  # (C,) first row of each class
    lengths: np.ndarray  # (C,) true positives of each class

    @classmethod
    def build(cls, images: np.ndarray, classes: np.ndarray, scores: np.ndarray, tp: np.ndarray, fp: np.ndarray,
              class_count: int, image_count: int) -> "_Rankings":
        tp_images, fp_rows, fp_images, lengths = [], [], [], []
        start = 0
        for column in range(class_count):
            mine = np.nonzero(classes == column)[0]
            order = mine[np.argsort(-scores[mine], kind="stable")]  # equal scores keep file order, as the metric
            is_tp, is_fp = tp[order], fp[order]
            segment = np.cumsum(is_tp) - is_tp  # true positives ranked before each row
            kept = is_fp & (segment < is_tp.sum())  # false positives after the last true positive change no AP
            tp_images.append(images[order][is_tp])
            fp_rows.append(start + segment[kept])
            fp_images.append(images[order][kept])
            lengths.append(int(is_tp.sum()))
            start += lengths[-1]
        fp_before = scipy.sparse.csr_matrix(
            (np.ones(sum(len(rows) for rows in fp_rows)), (np.concatenate(fp_rows), np.concatenate(fp_images))),
            shape=(start, image_count))
        lengths = np.array(lengths, dtype=np.int64)
        return cls(np.concatenate(tp_images).astype(np.int64), fp_before, np.cumsum(lengths) - lengths, lengths)

    def _per_class_cumsum(self, values: np.ndarray) -> np.ndarray:
        """Running sums down each class's rows."""
        for start, length in zip(self.starts, self.lengths):
            if length > 1:
                np.cumsum(values[start : start + length], axis=0, out=values[start : start + length])
        return values

    def precision_recall(self, weights_t: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) at each true positive for each resample, as (K, B) arrays, from the
        transposed weights (images x resamples) and the positives of each class (C x resamples)."""
        true_positives = self._per_class_cumsum(weights_t[self.tp_images])
        false_positives = self._per_class_cumsum(self.fp_before @ weights_t)
        counted = true_positives + false_positives
        precision = np.divide(true_positives, counted, out=np.zeros_like(counted), where=counted > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = true_positives / np.repeat(positives, self.lengths, axis=0)
        return recall, precision

    def best_after(self, precision: np.ndarray) -> np.ndarray:
        """The best precision at or after each row, within its class."""
        best = np.empty_like(precision)
        for start, length in zip(self.starts, self.lengths):
            rows = slice(start, start + length)
            best[rows] = np.maximum.accumulate(precision[rows][::-1], axis=0)[::-1]
        return best

    def eleven_point_ap(self, recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
        """VOC 2007 AP of each class on each resample (C x B): at each recall level the best
        precision at that recall or beyond (0 when never reached), averaged over 11 levels.
        Precision peaks at true positives, so they decide every level, as in ``metrics.voc07_ap``.

        Where a level is first reached: each row counts the levels its recall reaches; recall
        rises down a class, so the rows of a class that reach at most level j come first, and
        their number (a histogram of those counts per class and resample, summed up to j) points
        at the first row past level j."""
        classes = len(self.lengths)
        positions, count = recall.shape
        aps = np.zeros((classes, count))
        if positions == 0:
            return aps
        best = self.best_after(precision)
        levels = np.array(ELEVEN_RECALL_LEVELS)
        span = len(levels) + 1
        reached = np.searchsorted(levels, recall, side="right")  # (K, B): levels <= recall, 0..11
        row_class = np.repeat(np.arange(classes), self.lengths)
        bins = (row_class[:, None] * count + np.arange(count)[None, :]) * span + reached
        histogram = np.bincount(bins.ravel(), minlength=classes * count * span).reshape(classes, count, span)
        below = np.cumsum(histogram[:, :, : len(levels)], axis=2)  # (C, B, 11): rows that stop short of level j
        first = self.starts[:, None, None] + below  # the first row of the class at or past level j
        reaches = below < self.lengths[:, None, None]
        values = np.where(reaches, best[np.minimum(first, positions - 1), np.arange(count)[None, :, None]], 0.0)
        return _sequential_sum(np.moveaxis(values, 2, 0)) / len(levels)

    def area_ap(self, recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
        """VOC 2010+ AP of each class on each resample (C x B): the area under the precision
        envelope, summed over the recall steps (each true positive's) as ``metrics.voc_area_ap``
        sums them (numpy's pairwise sum of each class's steps)."""
        best = self.best_after(precision)
        aps = np.zeros((len(self.lengths), recall.shape[1]))
        for column, (start, length) in enumerate(zip(self.starts, self.lengths)):
            if length:
                rows = slice(start, start + length)
                steps = np.diff(recall[rows], axis=0, prepend=0.0)
                aps[column] = np.sum(np.ascontiguousarray((steps * best[rows]).T), axis=1)
        return aps


def _mean_defined(values) -> np.ndarray:
    """Per resample, the mean of the values that are not NaN (NaN when none), adding in order."""
    defined = [~np.isnan(value) for value in values]
    total = _sequential_sum([np.where(ok, value, 0.0) for value, ok in zip(values, defined)])
    count = _sequential_sum([ok.astype(np.float64) for ok in defined])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


class TaskScores:
    """A trial's per-image scores of one task. ``images``: its test images (sorted ids); ``metric``
    gives the task's metric in percent for each row of a (B, len(images)) weight matrix."""

    images: tuple[str, ...]

    def metric(self, weights: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _index(names, values: pd.Series) -> np.ndarray:
    """Position of each value in ``names`` (-1 where absent)."""
    return pd.Index(list(names)).get_indexer(values)


def _unique(values: pd.Series) -> list[str]:
    return sorted(pd.unique(values.to_numpy(dtype=object)))


class DetectionScores(TaskScores):
    """VOC 2007 detection: mean over classes of 11-point AP (``voc07_det_map``)."""

    def __init__(self, detections: pd.DataFrame, positives: pd.DataFrame):
        self.images = tuple(_unique(positives["image_id"]))
        image_index = _index(self.images, detections["image_id"])
        if (image_index < 0).any():
            unknown = detections["image_id"].to_numpy(dtype=object)[image_index < 0]
            raise UnusableScores(f"{len(set(unknown))} detected images are not in voc07_det_positives.parquet "
                                 f"(e.g. {unknown[0]!r})")
        self.classes = _ordered(_unique(positives["class"]), VOC_CLASSES)
        self.positives_t = scipy.sparse.csr_matrix(  # (classes, images), duplicates summed
            (positives["positives"].to_numpy().astype(np.float64),
             (_index(self.classes, positives["class"]), _index(self.images, positives["image_id"]))),
            shape=(len(self.classes), len(self.images)))
        self.rankings = _Rankings.build(image_index, _index(self.classes, detections["class"]),
                                        *(detections[name].to_numpy() for name in ("score", "tp", "fp")),
                                        len(self.classes), len(self.images))

    def metric(self, weights: np.ndarray) -> np.ndarray:
        weights_t = np.ascontiguousarray(weights.T)
        positives = self.positives_t @ weights_t  # (classes, B)
        recall, precision = self.rankings.precision_recall(weights_t, positives)
        aps = np.where(positives > 0, self.rankings.eleven_point_ap(recall, precision), np.nan)  # no positive: undefined
        return 100 * _mean_defined(aps)


class ActionScores(TaskScores):
    """VOC 2012 actions: mean over actions of the area AP (``voc12_act_map``)."""

    def __init__(self, scores: pd.DataFrame):
        self.images = tuple(_unique(scores["image_id"]))
        self.actions = _ordered(_unique(scores["action"]), ACTION_CLASSES)
        image_index = _index(self.images, scores["image_id"])
        labels = scores["label"].to_numpy()
        self.rankings = _Rankings.build(image_index, _index(self.actions, scores["action"]), scores["score"].to_numpy(),
                                        labels == 1, labels == 0, len(self.actions), len(self.images))
        positive = labels == 1  # positives: the persons doing the action (every one is ranked)
        self.positives_t = scipy.sparse.csr_matrix(
            (np.ones(int(positive.sum())), (_index(self.actions, scores["action"])[positive], image_index[positive])),
            shape=(len(self.actions), len(self.images)))

    def metric(self, weights: np.ndarray) -> np.ndarray:
        weights_t = np.ascontiguousarray(weights.T)
        positives = self.positives_t @ weights_t  # (actions, B)
        recall, precision = self.rankings.precision_recall(weights_t, positives)
        aps = np.where(positives > 0, self.rankings.area_ap(recall, precision), np.nan)
        return 100 * _mean_defined(aps)


class SceneScores(TaskScores):
    """SUN397: mean over scenes of the fraction of that scene's test images predicted right (``sun397_acc``)."""

    def __init__(self, predictions: pd.DataFrame):
        if predictions["image_id"].duplicated().any():
            raise UnusableScores("sun397_predictions.parquet lists an image twice")
        predictions = predictions.sort_values("image_id", kind="stable")
        self.images = tuple(predictions["image_id"].to_numpy(dtype=object))
        self.scenes = _unique(predictions["label"])
        scene = _index(self.scenes, predictions["label"])
        right = (predictions["label"].to_numpy(dtype=object) == predictions["prediction"].to_numpy(dtype=object))
        right = right.astype(np.float64)
        rows = np.arange(len(self.images))
        shape = (len(self.images), len(self.scenes))
        self.members = scipy.sparse.csr_matrix((np.ones(len(rows)), (scene, rows)), shape=shape[::-1])
        self.correct = scipy.sparse.csr_matrix((right, (scene, rows)), shape=shape[::-1])

    def metric(self, weights: np.ndarray) -> np.ndarray:
        weights_t = np.ascontiguousarray(weights.T)
        totals = (self.members @ weights_t).T  # (B, scenes)
        correct = (self.correct @ weights_t).T
        with np.errstate(invalid="ignore", divide="ignore"):
            per_scene = correct / totals
        per_scene[totals == 0] = np.nan  # a scene absent from the resample
        return 100 * _mean_defined(list(per_scene.T))


def load_task(metric: str, folder: str | Path) -> TaskScores:
    """The per-image scores behind ``metric`` from a folder holding its files (``METRIC_FILES``)."""
    folder = Path(folder)
    if metric not in METRIC_FILES:
        raise UnusableScores(f"{metric} has no per-image scores (known: {', '.join(METRIC_FILES)})")
    frames = [read_scores(folder / name) for name in METRIC_FILES[metric]]
    if metric == "voc07_det_map":
        return DetectionScores(*frames)
    if metric == "voc12_act_map":
        return ActionScores(*frames)
    return SceneScores(*frames)
