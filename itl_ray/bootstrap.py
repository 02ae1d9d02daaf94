"""Confidence intervals for the difference of a metric between two points of the study.

Two sources of noise, two intervals:

- **Test images** (paired bootstrap): the test set is a sample of images. Resample it with
  replacement ``resamples`` times (the same resamples for both sides, hence "paired"), recompute
  each side's metric on every resample (``itl_ray.per_image``), and take the 2.5th and 97.5th
  percentiles of the differences (Efron and Tibshirani 1993, the percentile interval; the paired
  form is the one used to compare two systems on one test set, e.g. Koehn 2004). A side with
  several seeds is the mean over its seeds on each resample.
- **Seeds**: pretraining and fine-tuning from another seed give another network. With the same
  seeds on both sides the differences are paired by seed and the interval is Student's t on
  their mean; otherwise Welch's t on the two means. Needs at least two seeds a side.

"No significant difference" is said only where the interval covers zero.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

RESAMPLES = 1000  # bootstrap resamples (enough for stable 2.5 / 97.5 percentiles)
LEVEL = 0.95
CHUNK_WEIGHTS = 4_000_000  # resamples are evaluated in chunks of at most this many weights (32 MB)


@dataclass(frozen=True)
class Interval:
    """A difference (side A minus side B, in the metric's unit) with its 95% interval; ``low`` and
    ``high`` are None where there is no interval, and ``note`` says why."""

    estimate: float
    low: float | None
    high: float | None
    method: str  # "images" (paired bootstrap over test images) or "seeds"
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.low is None or self.high is None:
            return "no interval"
        if self.low > 0:
            return "A higher"
        if self.high < 0:
            return "A lower"
        return "no significant difference"


def resample_weights(count: int, resamples: int, seed: int | Sequence[int]) -> np.ndarray:
    """(resamples, count) multiplicities: row b says how often each of ``count`` test images is
    drawn in resample b (``count`` draws with replacement; each row sums to ``count``)."""
    if count < 1:
        raise ValueError("resampling needs at least one test image")
    drawn = np.random.default_rng(seed).integers(0, count, size=(resamples, count))
    flat = (drawn + np.arange(resamples)[:, None] * count).ravel()
    return np.bincount(flat, minlength=resamples * count).reshape(resamples, count).astype(np.float64)


@functools.lru_cache(maxsize=8)
def _cached_weights(count: int, resamples: int, seed: tuple) -> np.ndarray:
    weights = resample_weights(count, resamples, seed)
    weights.flags.writeable = False
    return weights


def resampled_metric(metric: Callable[[np.ndarray], np.ndarray], count: int, resamples: int = RESAMPLES,
                     seed: int = 0) -> np.ndarray:
    """``metric`` (weights (B, count) -> values (B,)) on ``resamples`` resamples of ``count`` test
    images, evaluated in chunks of ``chunk_size(count)`` resamples. The same ``count``,
    ``resamples`` and ``seed`` give the same resamples, so metrics of two trials on one test set
    are paired."""
    values = []
    chunk = chunk_size(count)
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        # One fixed stream per chunk; one chunk (the usual case) is kept for the next trial's metric.
        weights = (_cached_weights(count, rows, (seed, start)) if rows == resamples
                   else resample_weights(count, rows, seed=(seed, start)))
        values.append(metric(weights))
    return np.concatenate(values)


def chunk_size(count: int) -> int:
    """Resamples evaluated at once for a test set of ``count`` images (all 1000 for VOC 2007's
    4,952 images would be 40 MB of weights; SUN397's 19,850 go 201 at a time)."""
    return max(1, CHUNK_WEIGHTS // max(1, count))


def percentile_interval(differences: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central ``level`` interval of the bootstrap differences (resamples where a side is
    undefined, e.g. no positive drawn, are left out)."""
    finite = differences[np.isfinite(differences)]
    if finite.size == 0:
        raise ValueError("no resample gave a defined difference")
    half = 50 * level  # 47.5 for 95%: the percentiles 2.5 and 97.5 come out exact
    low, high = np.percentile(finite, [50 - half, 50 + half])
    return float(low), float(high)


def image_interval(side_a: Sequence[np.ndarray], side_b: Sequence[np.ndarray], estimate: float,
                   level: float = LEVEL) -> Interval:
    """Paired bootstrap interval of mean(A) - mean(B); each side a list of per-seed resampled
    metric vectors over the same resamples."""
    differences = np.mean(side_a, axis=0) - np.mean(side_b, axis=0)
    low, high = percentile_interval(differences, level)
    return Interval(estimate, low, high, "images", f"{differences.size} paired resamples of the test images")


def _t_quantile(freedom: float, level: float) -> float:
    """The two-sided ``level`` quantile of Student's t with ``freedom`` degrees of freedom."""
    from scipy.special import stdtrit  # scipy.stats.t.ppf, without importing all of scipy.stats

    return float(stdtrit(freedom, 0.5 + level / 2))


def seed_interval(side_a: dict[int, float], side_b: dict[int, float], level: float = LEVEL) -> Interval:
    """Interval of mean(A) - mean(B) over seeds (seed -> metric value). Same seeds on both sides:
    paired t on the per-seed differences; otherwise Welch's t."""
    a, b = np.array(list(side_a.values()), float), np.array(list(side_b.values()), float)
    estimate = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    if set(side_a) == set(side_b):
        if len(side_a) < 2:
            return Interval(estimate, None, None, "seeds", "one seed: no interval across seeds")
        differences = np.array([side_a[seed] - side_b[seed] for seed in sorted(side_a)])
        half = _t_quantile(len(differences) - 1, level) * differences.std(ddof=1) / math.sqrt(len(differences))
        mean = float(differences.mean())
        return Interval(mean, mean - half, mean + half, "seeds", f"paired t over {len(differences)} seeds")
    if a.size < 2 or b.size < 2:
        return Interval(estimate, None, None, "seeds", "fewer than two seeds on a side: no interval across seeds")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    if va + vb == 0:
        return Interval(estimate, estimate, estimate, "seeds", f"Welch t over {a.size} and {b.size} seeds (no spread)")
    freedom = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = _t_quantile(freedom, level) * math.sqrt(va + vb)
    return Interval(estimate, estimate - half, estimate + half, "seeds", f"Welch t over {a.size} and {b.size} seeds")
