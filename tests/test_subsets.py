"""Subsets: nested, seeded, identical in every process, with the shortfall policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from itl_ray import subsets
from itl_ray.errors import UserError
from itl_ray.shards import Prepared


def candidates(mini_paths):
    data = Prepared(mini_paths["imagenet"], "imagenet")
    rows = data.rows_in("train")
    labels, sources = data.column("label"), data.column("source")
    return [labels[row] for row in rows], [subsets.image_key(sources[row]) for row in rows]


def test_subsets_are_nested(mini_paths):
    labels, keys = candidates(mini_paths)
    small = subsets.select(labels, keys, 5, 4, seed=0)
    large = subsets.select(labels, keys, 10, 8, seed=0)
    assert len(small.indices) == 20 and len(large.indices) == 80
    assert set(small.classes) < set(large.classes)
    assert set(small.indices) < set(large.indices)
    assert {labels[i] for i in small.indices} == set(small.classes)
    for wnid in small.classes:  # each class's 4 images are the first 4 of its 8
        assert [i for i in small.indices if labels[i] == wnid] == [i for i in large.indices if labels[i] == wnid][:4]
    assert small.subset_hash != large.subset_hash
    assert subsets.select(labels, keys, 5, 4, seed=1).subset_hash != small.subset_hash


def test_subset_does_not_depend_on_candidate_order(mini_paths):
    labels, keys = candidates(mini_paths)
    forward = subsets.select(labels, keys, 6, 5, seed=2)
    backward = subsets.select(labels[::-1], keys[::-1], 6, 5, seed=2)
    assert forward.subset_hash == backward.subset_hash
    assert [keys[i] for i in forward.indices] == [keys[::-1][i] for i in backward.indices]


def test_shortfall_policy(mini_paths):
    labels, keys = candidates(mini_paths)
    with pytest.raises(UserError, match="images_per_class=13, but no chosen class has more than 12"):
        subsets.select(labels, keys, 3, 13, seed=0)
    with pytest.raises(UserError, match="num_classes=41"):
        subsets.select(labels, keys, 41, 2, seed=0)
    # One class with fewer images than asked: take_all records the shortfall, error refuses.
    short = labels[0]
    kept = [i for i, label in enumerate(labels) if label != short or i < 5]
    few_labels, few_keys = [labels[i] for i in kept], [keys[i] for i in kept]
    chosen = subsets.select(few_labels, few_keys, None, 8, seed=0)
    assert chosen.shortfall == {short: 3}
    assert len(chosen.indices) == 39 * 8 + 5
    with pytest.raises(UserError, match=f"class {short} has 5 images, fewer than pretrain.images_per_class=8"):
        subsets.select(few_labels, few_keys, None, 8, seed=0, shortfall_policy="error")


def test_subset_identical_across_processes(mini_paths):
    code = ("import sys; from itl_ray import subsets; from tests.test_subsets import candidates;"
            "labels, keys = candidates({'imagenet': sys.argv[1]});"
            "chosen = subsets.select(labels, keys, 7, 5, seed=3); print(chosen.subset_hash, chosen.indices)")
    outputs = set()
    for hash_seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", code, mini_paths["imagenet"]], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed}, check=True)
        outputs.add(out.stdout.strip())
    assert len(outputs) == 1
