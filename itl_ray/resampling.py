"""Each trial's transfer metrics on bootstrap resamples of its test images, from the per-image
scores it logged (MLflow artifacts under ``per_image/``), for the report's intervals.

Every trial's metric is computed once on the same ``resamples`` resamples of its test set (fixed
seed ``BOOTSTRAP_SEED``: a report is reproducible, and two trials tested on the same images are
paired). The trials are independent of each other, so they are resampled in parallel worker
processes, one trial at a time each (forked from the report's process where the platform can
fork, serially otherwise).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from itl_ray import bootstrap
from itl_ray.per_image import FOLDER as PER_IMAGE, METRIC_FILES, UnusableScores, load_task

BOOTSTRAP_SEED = 0
NO_SCORES = f"no per-image scores ({PER_IMAGE}/ artifacts)"

# What a trial's metric gives on the resamples: (a key of the test images, the values), or why not.
Resampled = tuple[str, np.ndarray] | str


def _resample_trial(job: tuple[str, tuple[str, ...], int]) -> dict[str, Resampled]:
    """One trial (a folder of per-image files): each metric on the resamples, or why not."""
    folder, metrics, resamples = job
    out: dict[str, Resampled] = {}
    for metric in metrics:
        try:
            task = load_task(metric, folder)
        except UnusableScores as error:
            out[metric] = str(error)
            continue
        key = hashlib.sha256("\n".join(task.images).encode()).hexdigest()
        out[metric] = (key, bootstrap.resampled_metric(task.metric, len(task.images), resamples, seed=BOOTSTRAP_SEED))
    return out


class TrialResamples:
    """The trials' resampled metrics, computed for a set of runs at once (``prepare``)."""

    def __init__(self, store, resamples: int, scratch: Path, workers: int | None = None):
        self.store, self.resamples, self.scratch = store, resamples, scratch
        self.workers = workers or os.cpu_count() or 1
        self._found: dict[str, dict[str, Resampled] | str] = {}

    def prepare(self, runs: pd.DataFrame) -> None:
        """Find each run's per-image scores (read in place from a local artifact store, else
        downloaded) and resample every metric that has them."""
        jobs = {}
        for run_id, artifact_uri in zip(runs["run_id"], runs["artifact_uri"]):
            if run_id in self._found:
                continue
            folder = self.store.run_folder(artifact_uri, PER_IMAGE, self.scratch / run_id)
            if folder is None:
                self._found[run_id] = NO_SCORES
            else:
                jobs[run_id] = (str(folder), tuple(METRIC_FILES), self.resamples)
        workers = min(self.workers, len(jobs))
        if workers > 1 and "fork" in multiprocessing.get_all_start_methods():
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                results = pool.map(_resample_trial, jobs.values())
                self._found.update(zip(jobs, results))
        else:
            self._found.update((run_id, _resample_trial(job)) for run_id, job in jobs.items())

    def without_scores(self, run_ids) -> int:
        """How many of these runs have no per-image scores at all."""
        return sum(self._found.get(run_id) == NO_SCORES for run_id in run_ids)

    def of(self, run_id: str, metric: str) -> Resampled:
        found = self._found.get(run_id, "not prepared")
        return found if isinstance(found, str) else found.get(metric, f"{metric} has no per-image scores")


def image_interval(side_a: pd.DataFrame, side_b: pd.DataFrame, metric: str, estimate: float,
                   resampled: TrialResamples | None) -> bootstrap.Interval:
    """Paired bootstrap interval over test images of mean(A) - mean(B) (each side: the runs of a
    point, one per seed), or the reason it is left out."""
    if resampled is None:
        return bootstrap.Interval(estimate, None, None, "images", "bootstrap turned off (--resamples 0)")
    if metric not in METRIC_FILES:
        return bootstrap.Interval(estimate, None, None, "images", f"{metric} has no per-image scores")
    found = {}
    for _, run in pd.concat([side_a, side_b]).iterrows():
        result = resampled.of(run["run_id"], metric)
        if isinstance(result, str):
            seed = "?" if pd.isna(run["seed"]) else int(run["seed"])
            return bootstrap.Interval(estimate, None, None, "images",
                                      f"{result} for run {run['run_id'][:8]} ({run['point']}, seed {seed})")
        found[run["run_id"]] = result
    if len({key for key, _ in found.values()}) > 1:
        return bootstrap.Interval(estimate, None, None, "images", "the trials were tested on different images")
    try:
        return bootstrap.image_interval([found[r][1] for r in side_a["run_id"]], [found[r][1] for r in side_b["run_id"]],
                                        estimate)
    except ValueError as error:
        return bootstrap.Interval(estimate, None, None, "images", str(error))
