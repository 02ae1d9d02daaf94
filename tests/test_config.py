from __future__ import annotations

import pytest

from itl_ray.config import TrialConfig, load_spec, parse_overrides, trial_id
from itl_ray.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_spec_grid_and_extra_trials(tmp_path):
    spec = load_spec(write(tmp_path, """
name: s
pretrain: {epochs: 3}
grid:
  pretrain.num_classes: [10, 40]
  pretrain.images_per_class: [40, 120]
extra_trials:
  - {pretrain.images_per_class: 0}
"""))
    trials = spec.trials()
    assert [(t.pretrain.num_classes, t.pretrain.images_per_class) for t in trials] == [
        (10, 40), (10, 120), (40, 40), (40, 120), (None, 0)]
    assert all(t.pretrain.epochs == 3 and t.name == "s" for t in trials)
    assert len({trial_id(t) for t in trials}) == 5
    assert trials[0].data.imagenet.startswith("/")  # relative paths made absolute


def test_overrides_are_typed(tmp_path):
    spec = load_spec(write(tmp_path, "name: s\n"), parse_overrides(["pretrain.lr=0.5", "model.width=1", "data.imagenet=/x"]))
    assert spec.trial.pretrain.lr == 0.5 and spec.trial.model.width == 1.0 and spec.trial.data.imagenet == "/x"


@pytest.mark.parametrize("text, message", [
    ("pretrain: {epoch: 3}\n", "unknown key 'pretrain.epoch'"),
    ("pretrain: {epochs: three}\n", "pretrain.epochs: expected int"),
    ("model: {width: [1]}\n", "model.width: expected float"),
    ("transfer: {scene: {lr: x}}\n", "transfer.scene.lr: expected float"),
    ("grid: {pretrain.bogus: [1]}\n", "grid: unknown key 'pretrain.bogus'"),
    ("pretrain: {images_per_class: -1}\n", "pretrain.images_per_class must be >= 0"),
    ("model: {resolution: 38}\n", "model.resolution must be >= 39 px"),
    ("model: {width: 0}\n", "model.width must be > 0"),
    ("- a\n- b\n", "must hold a YAML mapping"),
    ("a: [1,\n", "is not valid YAML"),
])
def test_bad_specs_name_the_key(tmp_path, text, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_spec(write(tmp_path, text))


def test_missing_spec_file_is_named(tmp_path):
    with pytest.raises(UserError, match="nope.yaml"):
        load_spec(tmp_path / "nope.yaml")


def test_trial_id_is_stable():
    assert trial_id(TrialConfig()) == trial_id(TrialConfig())
    assert trial_id(TrialConfig(seed=1)) != trial_id(TrialConfig())


def test_experiments_share_trials_and_seeds_repeat_them(tmp_path):
    spec = load_spec(write(tmp_path, """
name: study
seeds: [0, 1]
experiments:
  images_per_class:
    grid: {pretrain.images_per_class: [100, 50]}
  split:
    grid: {pretrain.label_set: [fine, random_a]}
    settings: {pretrain.images_per_class: 100}
  budget:
    trials:
      - {pretrain.num_classes: 20, pretrain.images_per_class: 50}
extra_trials:
  - {pretrain.images_per_class: 0}
"""))
    planned = spec.planned()
    # 100/fine is in images_per_class and split: once per seed, tagged with both.
    points = [(p.config.pretrain.images_per_class, p.config.pretrain.label_set, p.config.pretrain.num_classes,
               p.config.seed, p.experiments) for p in planned]
    assert points == [
        (100, "fine", None, 0, ("images_per_class", "split")), (100, "fine", None, 1, ("images_per_class", "split")),
        (50, "fine", None, 0, ("images_per_class",)), (50, "fine", None, 1, ("images_per_class",)),
        (100, "random_a", None, 0, ("split",)), (100, "random_a", None, 1, ("split",)),
        (50, "fine", 20, 0, ("budget",)), (50, "fine", 20, 1, ("budget",)),
        (0, "fine", None, 0, ("images_per_class", "split", "budget")),
        (0, "fine", None, 1, ("images_per_class", "split", "budget")),
    ]
    assert len({trial_id(p.config) for p in planned}) == len(planned) == len(spec.trials())
    assert spec.experiment_names() == ["images_per_class", "split", "budget"]
    assert spec.varying_keys()[-1] == "seed"


def test_one_experiment_is_named_after_the_sweep_and_seeds_apply(tmp_path):
    spec = load_spec(write(tmp_path, "name: My Sweep\nseeds: [3, 4]\ngrid: {pretrain.epochs: [1, 2]}\n"))
    assert spec.experiment_names() == ["my_sweep"]
    assert [(t.pretrain.epochs, t.seed) for t in spec.trials()] == [(1, 3), (1, 4), (2, 3), (2, 4)]
    only_listed = load_spec(write(tmp_path, "name: s\nextra_trials: [{pretrain.epochs: 7}]\n"))
    assert [t.pretrain.epochs for t in only_listed.trials()] == [7]  # no grid: the listed trials only


@pytest.mark.parametrize("text, message", [
    ("experiments: {a: {grid: {pretrain.epochs: [1]}}}\ngrid: {seed: [1]}\n", "grid: a spec with experiments"),
    ("experiments: {Bad-Name: {grid: {pretrain.epochs: [1]}}}\n", "experiments.Bad-Name: an experiment name"),
    ("experiments: {a: {}}\n", "experiments.a: no trials"),
    ("experiments: {a: {grid: {pretrain.epochs: []}}}\n", "experiments.a.grid.pretrain.epochs: the list of values is empty"),
    ("experiments: {a: {trials: [{pretrain.epochs: x}]}}\n", "experiments.a.trials[0]: pretrain.epochs: expected int"),
    ("experiments: {a: {grid: {pretrain.epochs: [1]}, bogus: 1}}\n", "unknown key 'experiments.a.bogus'"),
    ("seeds: [0, 1]\ngrid: {seed: [1, 2]}\n", "sets seed, which `seeds: [0, 1]` already varies"),
    ("seeds: [1, 1]\n", "seeds: [1, 1] lists a seed twice"),
])
def test_bad_experiment_specs_name_the_key(tmp_path, text, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(".", r"\.").replace("]", r"\]")):
        load_spec(write(tmp_path, text))


def test_the_study_specs_load():
    from pathlib import Path

    sweeps = Path(__file__).resolve().parents[1] / "sweeps"
    paper = load_spec(sweeps / "paper.yaml")
    assert paper.experiment_names() == ["images_per_class", "number_of_classes", "fixed_budget", "split",
                                        "pascal_removed", "induction"]
    assert len(paper.trials()) == 22 * 3  # 22 distinct settings (the baseline and control shared), 3 seeds
    baseline = [p for p in paper.planned() if p.config.pretrain.images_per_class == 1300
                and p.config.pretrain.label_set == "fine"]
    assert len(baseline) == 3 and set(baseline[0].experiments) == {"images_per_class", "number_of_classes", "split",
                                                                    "pascal_removed", "induction"}
    mini = load_spec(sweeps / "mini_paper.yaml")
    assert mini.experiment_names() == paper.experiment_names()
    for name in ("images_per_class", "number_of_classes", "fixed_budget", "split", "pascal_removed", "induction"):
        assert load_spec(sweeps / f"{name}.yaml").experiment_names() == [name]
    # 12 hex digits, the same in another process with another hash seed (it names MLflow runs).
    import os
    import re
    import subprocess
    import sys

    code = "from itl_ray.config import TrialConfig, trial_id; print(trial_id(TrialConfig(seed=3)))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "7"}).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", other) and other == trial_id(TrialConfig(seed=3))


def test_the_config_does_not_import_the_data_generator():
    """The config learns where prepared data lies from itl_ray.shards; the generator (and WordNet)
    stay out of every process that only reads a spec."""
    import ast
    import subprocess
    import sys

    code = "import sys, itl_ray.config; print(sorted(m for m in sys.modules if m.startswith('itl_ray.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = ast.literal_eval(done.stdout)
    assert "itl_ray.shards" in loaded
    assert "itl_ray.datasets.synthetic" not in loaded and "itl_ray.wordnet" not in loaded
    assert TrialConfig().data.voc2012.endswith("data/mini-shards/voc2012-action")  # prepare's kind as folder

