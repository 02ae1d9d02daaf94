"""Confidence intervals on constructed cases whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from itl_ray.bootstrap import image_interval, resample_weights, resampled_metric, seed_interval
from itl_ray.per_image import SceneScores


def scenes(correct: np.ndarray) -> SceneScores:
    """A scene trial on 200 images of 4 scenes, right exactly where ``correct`` is True."""
    labels = np.array(["/a/abbey", "/b/beach", "/k/kitchen", "/o/office"])[np.arange(200) % 4]
    wrong = np.roll(labels, 1)
    return SceneScores(pd.DataFrame({"image_id": [f"{i:04d}" for i in range(200)], "label": labels,
                                     "prediction": np.where(correct, labels, wrong)}))


def test_resamples_draw_every_image_count_times_in_total():
    weights = resample_weights(50, 30, seed=1)
    assert weights.shape == (30, 50) and (weights.sum(axis=1) == 50).all() and (weights >= 0).all()
    assert not np.array_equal(weights[0], weights[1])
    assert np.array_equal(weights, resample_weights(50, 30, seed=1))


def test_identical_trials_give_exactly_zero():
    rng = np.random.default_rng(0)
    trial = scenes(rng.random(200) < 0.6)
    a = resampled_metric(trial.metric, 200, resamples=300, seed=5)
    b = resampled_metric(trial.metric, 200, resamples=300, seed=5)
    interval = image_interval([a], [b], estimate=0.0)
    assert (interval.low, interval.high) == (0.0, 0.0)
    assert interval.verdict == "no significant difference"


def test_a_trial_better_on_every_image_is_significantly_better():
    rng = np.random.default_rng(1)
    weaker = rng.random(200) < 0.5
    better = scenes(np.ones(200, bool))  # right on every image, also where the other is right
    worse = scenes(weaker)
    a = resampled_metric(better.metric, 200, resamples=500, seed=2)
    b = resampled_metric(worse.metric, 200, resamples=500, seed=2)
    assert (a >= b).all()
    estimate = better.metric(np.ones((1, 200)))[0] - worse.metric(np.ones((1, 200)))[0]
    interval = image_interval([a], [b], estimate)
    assert 0 < interval.low <= estimate <= interval.high
    assert interval.verdict == "A higher"
    swapped = image_interval([b], [a], -estimate)
    assert swapped.verdict == "A lower" and swapped.high < 0


def test_the_interval_is_the_percentiles_of_explicit_paired_resamples():
    rng = np.random.default_rng(3)
    first, second = scenes(rng.random(200) < 0.55), scenes(rng.random(200) < 0.65)
    a = resampled_metric(first.metric, 200, resamples=400, seed=9)
    b = resampled_metric(second.metric, 200, resamples=400, seed=9)
    # The same resamples drawn again, each as an explicit list of image indices.
    differences = []
    for start in range(0, 400, 400):
        for row in resample_weights(200, 400, seed=(9, start)):
            drawn = np.repeat(np.arange(200), row.astype(int))
            once = np.bincount(drawn, minlength=200)[None].astype(float)
            differences.append(first.metric(once)[0] - second.metric(once)[0])
    interval = image_interval([a], [b], estimate=0.0)
    assert (interval.low, interval.high) == tuple(np.percentile(differences, [2.5, 97.5]))


def test_seed_intervals():
    paired = seed_interval({0: 51.0, 1: 52.0, 2: 53.0}, {0: 50.0, 1: 50.0, 2: 50.0})
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2 degrees of freedom) = 4.302653
    assert paired.estimate == 2.0
    assert paired.low == pytest.approx(2 - 4.302653 / math.sqrt(3), abs=1e-5)
    assert paired.high == pytest.approx(2 + 4.302653 / math.sqrt(3), abs=1e-5)
    assert paired.verdict == "no significant difference"
    tight = seed_interval({0: 60.0, 1: 60.5}, {0: 50.0, 1: 50.2})
    assert tight.verdict == "A higher"
    one = seed_interval({0: 51.0}, {0: 50.0})
    assert one.low is None and one.verdict == "no interval" and "one seed" in one.note
    welch = seed_interval({0: 1.0, 1: 2.0, 2: 3.0}, {5: 0.0, 6: 1.0})
    assert welch.note.startswith("Welch") and welch.low < welch.estimate == 1.5 < welch.high
