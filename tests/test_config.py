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

