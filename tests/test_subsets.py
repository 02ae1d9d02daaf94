from __future__ import annotations

import os
import subprocess
import sys

import pytest

from itl_ray import subsets
from itl_ray.datasets.imagenet import read_imagenet
from itl_ray.errors import UserError


def test_subsets_are_nested(mini_paths):
    data = read_imagenet(mini_paths["imagenet"])
    small = subsets.select(data, 5, 4, seed=0)
    large = subsets.select(data, 10, 8, seed=0)
    assert len(small.images) == 20 and len(large.images) == 80
    assert set(small.classes) < set(large.classes)
    assert {i.path for i in small.images} < {i.path for i in large.images}
    assert small.subset_hash != large.subset_hash
    assert subsets.select(data, 5, 4, seed=1).subset_hash != small.subset_hash


def test_shortfall_policy(mini_paths):
    data = read_imagenet(mini_paths["imagenet"])
    with pytest.raises(UserError, match="images_per_class=13, but no chosen class has more than 12"):
        subsets.select(data, 3, 13, seed=0)
    with pytest.raises(UserError, match="num_classes=41"):
        subsets.select(data, 41, 2, seed=0)


def test_subset_identical_across_processes(mini_paths):
    code = ("import sys; from itl_ray import subsets; from itl_ray.datasets.imagenet import read_imagenet;"
            "print(subsets.select(read_imagenet(sys.argv[1]), 7, 5, seed=3).subset_hash)")
    hashes = set()
    for hash_seed in ("1", "2", "3"):
        out = subprocess.run([sys.executable, "-c", code, mini_paths["imagenet"]], capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed}, check=True)
        hashes.add(out.stdout.strip())
    assert len(hashes) == 1
