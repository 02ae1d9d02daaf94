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
from itl_ray.metrics import ELEVEN_RECALL_LEVELS

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


def _ordered(names, known: tuple[str, ...]) -> list[str]:
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
class _Ranking:
    """One class's rows best first, reduced to what AP needs on any resample: the image of each
    true positive, and a sparse (images x true positives) count of the false positives ranked
    between the previous true positive and this one."""

    tp_images: np.ndarray  # (K,) image index of each true positive, best first
    fp_before: scipy.sparse.csr_matrix  # (N, K) false positives of image i ranked just before tp k

    @classmethod
    def build(cls, images: np.ndarray, scores: np.ndarray, tp: np.ndarray, fp: np.ndarray, count: int) -> "_Ranking":
        order = np.argsort(-scores, kind="stable")  # equal scores keep file order, as the metric does
        images, tp, fp = images[order], tp[order], fp[order]
        segment = np.cumsum(tp) - tp  # true positives ranked before each row
        kept = fp & (segment < tp.sum())  # false positives after the last true positive change no precision that counts
        fp_before = scipy.sparse.csr_matrix((np.ones(int(kept.sum())), (images[kept], segment[kept])),
                                            shape=(count, int(tp.sum())))
        return cls(images[tp], fp_before)

    def precision_recall(self, weights: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) at each true positive for each resample: (B, K) arrays."""
        true_positives = np.cumsum(weights[:, self.tp_images], axis=1)
        false_positives = np.cumsum(np.asarray(weights @ self.fp_before), axis=1)
        counted = true_positives + false_positives
        precision = np.divide(true_positives, counted, out=np.zeros_like(counted), where=counted > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = true_positives / positives[:, None]
        return recall, precision


def _suffix_max(values: np.ndarray) -> np.ndarray:
    """Best value at or after each position, along axis 1."""
    return np.maximum.accumulate(values[:, ::-1], axis=1)[:, ::-1]


def _eleven_point_ap(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """VOC 2007 AP per row from its true positives' (recall, precision): at each recall level the
    best precision at that recall or beyond (0 when never reached), averaged over 11 levels.
    Precision peaks at true positives, so they decide every level, as in ``metrics.voc07_ap``."""
    count, positions = recall.shape
    if positions == 0:
        return np.zeros(count)
    best = _suffix_max(precision)
    rows = np.arange(count)
    values = []
    for level in ELEVEN_RECALL_LEVELS:
        first = (recall < level).sum(axis=1)  # recall is non-decreasing along a row
        values.append(np.where(first < positions, best[rows, np.minimum(first, positions - 1)], 0.0))
    return _sequential_sum(values) / len(ELEVEN_RECALL_LEVELS)


def _area_ap(recall: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """VOC 2010+ AP per row: the area under the precision envelope, summed over the recall steps
    (each true positive's), as ``metrics.voc_area_ap`` sums them."""
    if recall.shape[1] == 0:
        return np.zeros(recall.shape[0])
    steps = np.diff(recall, axis=1, prepend=0.0)
    return np.sum(steps * _suffix_max(precision), axis=1)


def _mean_defined(values: list[np.ndarray]) -> np.ndarray:
    """Per row, the mean of the values that are not NaN (NaN when none), adding in list order."""
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


def _index(images: tuple[str, ...], ids: pd.Series) -> np.ndarray:
    position = {image: i for i, image in enumerate(images)}
    return ids.map(position).to_numpy(dtype=np.int64)


class DetectionScores(TaskScores):
    """VOC 2007 detection: mean over classes of 11-point AP (``voc07_det_map``)."""

    def __init__(self, detections: pd.DataFrame, positives: pd.DataFrame):
        self.images = tuple(sorted(set(positives["image_id"])))
        unknown = set(detections["image_id"]) - set(self.images)
        if unknown:
            raise UnusableScores(f"{len(unknown)} detected images are not in voc07_det_positives.parquet "
                                 f"(e.g. {sorted(unknown)[0]!r})")
        self.classes = _ordered(positives["class"], VOC_CLASSES)
        table = positives.pivot_table(index="image_id", columns="class", values="positives", aggfunc="sum",
                                      fill_value=0)
        self.positives = table.reindex(index=list(self.images), columns=self.classes, fill_value=0).to_numpy(np.float64)
        image_index = _index(self.images, detections["image_id"])
        self.rankings = {}
        for name in self.classes:
            mine = (detections["class"] == name).to_numpy()
            self.rankings[name] = _Ranking.build(image_index[mine], detections["score"].to_numpy()[mine],
                                                 detections["tp"].to_numpy()[mine], detections["fp"].to_numpy()[mine],
                                                 len(self.images))

    def metric(self, weights: np.ndarray) -> np.ndarray:
        positives = weights @ self.positives  # (B, classes)
        aps = []
        for column, name in enumerate(self.classes):
            recall, precision = self.rankings[name].precision_recall(weights, positives[:, column])
            ap = _eleven_point_ap(recall, precision)
            aps.append(np.where(positives[:, column] > 0, ap, np.nan))  # no positive: AP undefined
        return 100 * _mean_defined(aps)


class ActionScores(TaskScores):
    """VOC 2012 actions: mean over actions of the area AP (``voc12_act_map``)."""

    def __init__(self, scores: pd.DataFrame):
        self.images = tuple(sorted(set(scores["image_id"])))
        self.actions = _ordered(scores["action"], ACTION_CLASSES)
        image_index = _index(self.images, scores["image_id"])
        self.rankings = {}
        for name in self.actions:
            mine = (scores["action"] == name).to_numpy()
            label = scores["label"].to_numpy()[mine]
            self.rankings[name] = _Ranking.build(image_index[mine], scores["score"].to_numpy()[mine], label == 1,
                                                 label == 0, len(self.images))

    def metric(self, weights: np.ndarray) -> np.ndarray:
        aps = []
        for name in self.actions:
            ranking = self.rankings[name]
            positives = weights[:, ranking.tp_images].sum(axis=1) if len(ranking.tp_images) else np.zeros(len(weights))
            recall, precision = ranking.precision_recall(weights, positives)
            aps.append(np.where(positives > 0, _area_ap(recall, precision), np.nan))
        return 100 * _mean_defined(aps)


class SceneScores(TaskScores):
    """SUN397: mean over scenes of the fraction of that scene's test images predicted right (``sun397_acc``)."""

    def __init__(self, predictions: pd.DataFrame):
        if predictions["image_id"].duplicated().any():
            raise UnusableScores("sun397_predictions.parquet lists an image twice")
        predictions = predictions.sort_values("image_id", kind="stable")
        self.images = tuple(predictions["image_id"])
        self.scenes = sorted(set(predictions["label"]))
        scene = predictions["label"].map({name: i for i, name in enumerate(self.scenes)}).to_numpy()
        right = (predictions["label"] == predictions["prediction"]).to_numpy(np.float64)
        rows = np.arange(len(self.images))
        shape = (len(self.images), len(self.scenes))
        self.members = scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, scene)), shape=shape)
        self.correct = scipy.sparse.csr_matrix((right, (rows, scene)), shape=shape)

    def metric(self, weights: np.ndarray) -> np.ndarray:
        totals = np.asarray(weights @ self.members)
        correct = np.asarray(weights @ self.correct)
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
