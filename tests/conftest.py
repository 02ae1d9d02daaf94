"""Shared fixtures: a small mini-benchmark in the real on-disk formats, made once per session by the
same generator as the demo's, and prepared into shards as the demo prepares it."""

from __future__ import annotations

from pathlib import Path

import pytest

from itl_ray.datasets.synthetic import Sizes, dataset_paths, synthesize
from itl_ray.prepare import prepare
from itl_ray.shards import PREPARE_KINDS, prepared_paths

SMALL = Sizes(train_per_class=12, val_per_class=3, voc07_trainval=24, voc07_test=24,
              voc12_train=20, voc12_val=20, sun_per_scene=4)

SHARED = Path(__file__).resolve().parents[2] / "shared"
RELEASE = SHARED / "reference" / "wmigftl"  # the study's released label sets and class lists
needs_release = pytest.mark.skipif(
    not RELEASE.is_dir(),
    reason=f"the study's released label sets are not at {RELEASE} (the shared folder beside the repository)",
)


def wnid(synset_name: str) -> str:
    """The wnid of an nltk synset name (``dog.n.01`` -> ``n02084071``), so expectations read as words."""
    from itl_ray import wordnet

    return wordnet.wnid_of(wordnet.load().synset(synset_name))


@pytest.fixture(scope="session")
def mini(tmp_path_factory) -> Path:
    return synthesize(tmp_path_factory.mktemp("bench") / "mini", seed=0, sizes=SMALL)


@pytest.fixture(scope="session")
def raw_paths(mini) -> dict[str, str]:
    """The mini-benchmark's dataset roots (what `itl-ray prepare` reads)."""
    return dataset_paths(mini)


@pytest.fixture(scope="session")
def mini_paths(mini, raw_paths) -> dict[str, str]:
    """The prepared mini-benchmark (what a trial's ``data`` settings point at)."""
    shards = mini.parent / "shards"
    for setting, kind in PREPARE_KINDS.items():
        prepare(kind, raw_paths[setting], prepared_paths(shards)[setting], workers=1)
    return prepared_paths(shards)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, str]:
    """The demo's mini-benchmark (the generator's default ``Sizes``), prepared as `make demo` prepares
    it: what ``data/mini-shards`` holds after `make demo`. Made once per session."""
    root = tmp_path_factory.mktemp("demo")
    raw = dataset_paths(synthesize(root / "mini", seed=0))
    shards = prepared_paths(root / "mini-shards")
    for setting, kind in PREPARE_KINDS.items():
        prepare(kind, raw[setting], shards[setting])
    return shards


def tiny_spec(path: Path, paths: dict[str, str], extra: str = "") -> Path:
    """A sweep spec that trains for seconds: 2 trials (one pretrained, one random-init control)."""
    path.write_text(f"""# A tiny sweep for the tests.
name: tiny
seed: 0
runtime: {{threads: 1}}
data:
  imagenet: {paths['imagenet']}
  voc2007: {paths['voc2007']}
  voc2012: {paths['voc2012']}
  sun397: {paths['sun397']}
model: {{width: 0.125, resolution: 48}}
pretrain: {{schedule: epochs, subset_schedule: same_epochs, epochs: 2, batch_size: 16, lr: 0.02, curve_every: 1}}
transfer:  # the mini-benchmark's ~140 px images at their size, sliding windows, a dozen steps
  detection: {{proposals: sliding_window, image_size: 64, max_size: 96, iterations: 12, lr_step: 9, lr: 0.01}}
  action: {{image_size: 64, max_size: 96, iterations: 10, lr_step: 8, lr: 0.003}}
  scene: {{epochs: 1, batch_size: 16}}
grid:
  pretrain.num_classes: [4]
  pretrain.images_per_class: [8]
extra_trials:
  - {{pretrain.images_per_class: 0, pretrain.num_classes: 4}}
resources: {{cpus_per_trial: 1}}
max_concurrent_trials: 2
{extra}
""")
    return path
