"""Induction accuracy: the per-class nearest-neighbour rule against a brute-force count, chunking that
changes nothing, the memory sample, the bad-input lines, and the study's finding in miniature: a
network pretrained on coarse WordNet label sets of the mini-benchmark's 40 classes separates the
fine classes well above chance, and below the network pretrained on the fine classes."""

from __future__ import annotations

import multiprocessing
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from itl_ray.config import load_spec, override
from itl_ray.errors import UserError
from itl_ray.metrics import INDUCTION_METRICS
from itl_ray.models import AlexNet
from itl_ray.shards import Prepared
from itl_ray.transfer.induction import (InductionConfig, class_scores, evaluate_induction, induction_data,
                                        ranked_classes)
from tests.conftest import tiny_spec

CPU = torch.device("cpu")
SMOKE = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"


def reference_scores(queries: np.ndarray, memory: list[np.ndarray], k: int) -> np.ndarray:
    """Brute force: per class, the mean of its min(k, size) highest cosine similarities to each query."""
    return np.stack([np.sort(queries @ features.T, axis=1)[:, ::-1][:, : min(k, len(features))].mean(1)
                     for features in memory], axis=1)


def normalised(rng, count, dim=16):
    features = np.abs(rng.normal(size=(count, dim))).astype(np.float32)  # non-negative, as after relu7
    return features / np.linalg.norm(features, axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 3])
def test_per_class_nearest_neighbours_match_a_brute_force_count(k):
    rng = np.random.default_rng(k)
    counts = [5, 3, 7, 4, 6, 5, 2, 7]  # unequal classes: the memory is padded; a class of 2 averages 2
    memory = [normalised(rng, count) for count in counts]
    queries = normalised(rng, 50)
    padded = torch.zeros((len(counts), max(counts), 16))
    valid = torch.zeros((len(counts), max(counts)), dtype=torch.bool)
    for index, features in enumerate(memory):
        padded[index, : len(features)] = torch.from_numpy(features)
        valid[index, : len(features)] = True
    reference = reference_scores(queries, memory, k)
    expected = np.argsort(-reference, axis=1, kind="stable")[:, :5]
    for chunk in (1, 3, 100):  # chunking over classes changes nothing
        scores = class_scores(torch.from_numpy(queries), padded, valid, k, chunk)
        assert np.allclose(scores.numpy(), reference, atol=1e-6)
        assert (ranked_classes(scores, 5).numpy() == expected).all()
    if k == 1:  # top-1 is the class of the nearest training image overall (plain 1-NN), top-5 the 5
        everything = np.concatenate(memory)  # distinct classes nearest
        owner = np.concatenate([[index] * count for index, count in enumerate(counts)])
        order = owner[np.argsort(-(queries @ everything.T), axis=1)]
        nearest_classes = [list(dict.fromkeys(row))[:5] for row in order]
        assert (expected == np.array(nearest_classes)).all()


def test_the_memory_is_a_seeded_sample_of_each_class(mini_paths):
    imagenet = Prepared(mini_paths["imagenet"], "imagenet")
    classes = sorted(set(imagenet.column("label")))[:6]
    data = induction_data(imagenet, classes, 5, seed=0, label_set="fine", pretrained_groups=6)
    labels = imagenet.column("label")
    assert list(np.bincount(data.train_labels)) == [5] * 6  # class by class
    assert [classes[i] for i in data.train_labels] == [labels[row] for row in data.train_rows]
    assert sorted(data.val_rows.tolist()) == sorted(r for r in imagenet.rows_in("val") if labels[r] in classes)
    assert (induction_data(imagenet, classes, 5, 0, "fine", 6).train_rows == data.train_rows).all()
    assert set(induction_data(imagenet, classes, 5, 1, "fine", 6).train_rows) != set(data.train_rows)
    smaller = induction_data(imagenet, classes, 3, 0, "fine", 6)  # nested: 3 per class lie inside 5
    assert set(smaller.train_rows) <= set(data.train_rows)
    more = induction_data(imagenet, classes, 500, 0, "fine", 6)  # a class gives what it has (12 here)
    assert list(np.bincount(more.train_labels)) == [12] * 6


def test_a_fine_network_has_nothing_to_induce_and_still_gives_the_reference(mini_paths):
    imagenet = Prepared(mini_paths["imagenet"], "imagenet")
    classes = sorted(set(imagenet.column("label")))
    torch.manual_seed(0)
    backbone = AlexNet(40, width=0.125, resolution=48, init="kaiming")
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    lines = []
    data = induction_data(imagenet, classes, 4, 0, "fine", pretrained_groups=40)
    output = evaluate_induction(backbone, data, InductionConfig(enabled=True, train_per_class=4), CPU, 0,
                                log=lines.append)
    assert set(output.metrics) == set(INDUCTION_METRICS) and output.per_image == {}
    assert 0 <= output.metrics["induction_top1"] <= output.metrics["induction_top5"] <= 100
    notes = [line for line in lines if "nothing to induce" in line]
    assert len(notes) == 1 and "label set fine" in notes[0] and "reference" in notes[0]
    assert all(torch.equal(value, before[name]) for name, value in backbone.state_dict().items())
    lines.clear()
    evaluate_induction(backbone, induction_data(imagenet, classes, 4, 0, "up_down_9", 9),
                       InductionConfig(train_per_class=4), CPU, 0, log=lines.append)
    assert not any("nothing to induce" in line for line in lines)


@pytest.mark.parametrize("override_, message", [
    ({"transfer.induction.k": 0}, r"transfer\.induction\.k=0 is out of range; allowed: >= 1"),
    ({"transfer.induction.k": 5, "transfer.induction.train_per_class": 3}, "transfer.induction: k=5 is more than"),
    ({"transfer.induction.train_per_class": 0}, r"transfer\.induction\.train_per_class=0 is out of range; allowed: >= 1"),
    ({"runtime.induction.batch_size": 0}, r"runtime\.induction\.batch_size=0 is out of range; allowed: >= 1"),
    ({"runtime.induction.classes_per_chunk": 0}, r"runtime\.induction\.classes_per_chunk=0 is out of range"),
])
def test_settings_are_checked_before_any_trial(tmp_path, mini_paths, override_, message):
    with pytest.raises(UserError, match=message):
        load_spec(tiny_spec(tmp_path / "s.yaml", mini_paths), override_)


def pretrained_induction(args) -> dict:
    """One trial of the demo's settings on ``label_set`` in this (fresh) process: pretraining, then
    induction only (the three fine-tunings are set to nothing)."""
    data, label_set = args
    from itl_ray.trial import run_trial

    spec = load_spec(SMOKE, {f"data.{setting}": path for setting, path in data.items()})
    config = override(spec.trials()[0], {
        "runtime.threads": 1, "pretrain.label_set": label_set, "pretrain.num_classes": 40, "pretrain.images_per_class": 40,
        "transfer.induction.enabled": True, "transfer.detection.epochs": 0, "transfer.action.epochs": 0,
        "transfer.scene.epochs": 0})
    with tempfile.TemporaryDirectory() as work:
        return run_trial(config, Path(work), lambda *report: None, log=lambda line: None)


def test_coarse_labels_induce_the_fine_classes_above_chance_and_below_fine_labels(demo_data):
    """The demo's network and pretraining schedule (sweeps/smoke.yaml) on 40 classes x 40 images,
    pretrained on the fine classes, on up_down_9 and on down_up_9 (9 groups each), three processes
    two at a time; induction of the 40 fine classes from 100 training images each, k = 1."""
    label_sets = ("fine", "up_down_9", "down_up_9")
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = dict(zip(label_sets, pool.map(pretrained_induction, [(demo_data, name) for name in label_sets])))
    top1 = {name: round(result["induction_top1"], 1) for name, result in results.items()}
    chance = 100 / 40
    for coarse in ("up_down_9", "down_up_9"):
        assert top1[coarse] > 4 * chance, top1  # well above chance
        assert top1[coarse] < top1["fine"], top1  # below the network trained on the fine classes
        assert results[coarse]["induction_top5"] > top1[coarse]
