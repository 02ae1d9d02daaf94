from __future__ import annotations

import re

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
    assert isinstance(spec.trial.model.width, float)


def test_a_key_given_twice_names_both_lines(tmp_path):
    text = "name: s\npretrain:\n  epochs: 3\ngrid:\n  pretrain.lr: [0.1]\npretrain:\n  batch_size: 8\n"
    with pytest.raises(UserError, match=r"spec file '.*spec\.yaml': key 'pretrain' is given twice \(lines 2 and 6\)"):
        load_spec(write(tmp_path, text))
    with pytest.raises(UserError, match=r"key 'transfer\.detection\.lr' is given twice \(lines 4 and 5\)"):
        load_spec(write(tmp_path, "name: s\ntransfer:\n  detection:\n    lr: 0.1\n    lr: 0.2\n"))
    with pytest.raises(UserError, match=r"key 'extra_trials\[1\]\.seed' is given twice"):
        load_spec(write(tmp_path, "name: s\nextra_trials:\n  - {seed: 1}\n  - {seed: 2, seed: 3}\n"))
    with pytest.raises(UserError, match=r"--set 'grid\.seed=\{a: 1, a: 2\}': key 'a' is given twice"):
        parse_overrides(["grid.seed={a: 1, a: 2}"])
    # A merge key is not a duplicate: the mapping's own key overrides the merged one, as YAML means.
    spec = load_spec(write(tmp_path, "name: s\ntransfer:\n  action: &fine {epochs: 3, lr: 0.1}\n"
                                     "  scene: {<<: *fine, lr: 0.2}\n"))
    assert spec.trial.transfer.scene.epochs == 3 and spec.trial.transfer.scene.lr == 0.2


def test_values_take_the_type_their_field_declares(tmp_path):
    """YAML 1.1 would read 1e-3 as text and off/no as booleans; a field's declared type decides."""
    spec = load_spec(write(tmp_path, """
name: no
seed: 7
pretrain: {lr: 1e-3, weight_decay: 5e-4, compile: off, channels_last: on, label_set: fine, num_classes: null}
model: {width: 1, resolution: 64}
transfer:
  detection: {window_sizes: [1e-1, .5], box_target_stds: [0.1, 0.1, 0.2, 2e-1]}
grid:
  pretrain.momentum: [0, 9e-1]
"""))
    pre = spec.trial.pretrain
    assert (pre.lr, pre.weight_decay, pre.compile, pre.channels_last, pre.num_classes) == (0.001, 0.0005, "off", "on", None)
    assert spec.trial.name == "no" and spec.trial.seed == 7 and spec.trial.model.width == 1.0
    assert spec.trial.transfer.detection.window_sizes == (0.1, 0.5)
    assert spec.trial.transfer.detection.box_target_stds == (0.1, 0.1, 0.2, 0.2)
    assert spec.grid == {"pretrain.momentum": [0.0, 0.9]}
    assert [t.pretrain.momentum for t in spec.trials()] == [0.0, 0.9]
    # The same from --set, and a quoted number given to a text field stays text.
    spec = load_spec(write(tmp_path, "name: '2024'\n"), parse_overrides(
        ["pretrain.lr=1e-3", "pretrain.compile=off", "pretrain.label_set=fine", "grid.pretrain.weight_decay=[5e-4, 0]"]))
    assert spec.trial.name == "2024" and spec.trial.pretrain.lr == 0.001 and spec.trial.pretrain.compile == "off"
    assert spec.grid == {"pretrain.weight_decay": [0.0005, 0.0]}
    # Unquoted numbers and booleans are text to a text field too: they never become numbers or booleans.
    spec = load_spec(write(tmp_path, "name: 2024\npretrain: {label_set: yes}\n"))
    assert spec.trial.name == "2024" and spec.trial.pretrain.label_set == "yes"


@pytest.mark.parametrize("text, message", [
    ("pretrain: {epoch: 3}\n", "unknown key 'pretrain.epoch'"),
    ("pretrain: {epochs: three}\n", "pretrain.epochs: expected int (a whole number), got 'three'"),
    ("pretrain: {epochs: 2.5}\n", "pretrain.epochs: expected int (a whole number), got '2.5'"),
    ("pretrain: {lr: .inf}\n", "pretrain.lr: expected float"),
    ("model: {width: [1]}\n", "model.width: expected float"),
    ("transfer: {scene: {lr: x}}\n", "transfer.scene.lr: expected float"),
    ("grid: {pretrain.bogus: [1]}\n", "grid: unknown key 'pretrain.bogus'"),
    ("grid: {pretrain.lr: []}\n", "grid.pretrain.lr=[] is out of range; allowed: not empty"),
    ("grid: {pretrain.epochs: [1, x]}\n", "grid.pretrain.epochs[1]: expected int"),
    ("extra_trials: [{pretrain.lr: -1}]\n", "extra_trials[0].pretrain.lr=-1.0 is out of range; allowed: > 0"),
    ("pretrain: {images_per_class: -1}\n", "pretrain.images_per_class=-1 is out of range; allowed: >= 0"),
    ("pretrain: {lr: -0.01}\n", "pretrain.lr=-0.01 is out of range; allowed: > 0"),
    ("pretrain: {momentum: -0.9}\n", "pretrain.momentum=-0.9 is out of range; allowed: >= 0 and < 1"),
    ("pretrain: {weight_decay: -5e-4}\n", "pretrain.weight_decay=-0.0005 is out of range; allowed: >= 0"),
    ("pretrain: {compile: yes}\n", "pretrain.compile='yes' is not one of the choices: auto, on, off"),
    ("model: {resolution: 38}\n", "model.resolution=38 is out of range; allowed: >= 39"),
    ("model: {resolution: 10}\n", "model.resolution=10 is out of range; allowed: >= 39"),
    ("model: {resolution: -64}\n", "model.resolution=-64 is out of range; allowed: >= 39"),
    ("model: {width: 0}\n", "model.width=0.0 is out of range; allowed: > 0"),
    ("model: {width: -0.25}\n", "model.width=-0.25 is out of range; allowed: > 0"),
    ("data: {sun397_partition: 11}\n", "data.sun397_partition=11 is out of range; allowed: >= 1 and <= 10"),
    ("data: {sun397_partition: 0}\n", "data.sun397_partition=0 is out of range; allowed: >= 1 and <= 10"),
    ("data: {imagenet: ''}\n", "data.imagenet='' is out of range; allowed: not empty"),
    ("seed: -1\n", "seed=-1 is out of range; allowed: >= 0"),
    ("resources: {cpus_per_trial: -1}\n", "resources.cpus_per_trial=-1.0 is out of range; allowed: > 0"),
    ("resources: {gpus_per_trial: -1}\n", "resources.gpus_per_trial=-1.0 is out of range; allowed: >= 0"),
    ("max_failures: -1\n", "max_failures=-1 is out of range; allowed: >= 0"),
    ("max_concurrent_trials: -2\n", "max_concurrent_trials=-2 is out of range; allowed: >= 0"),
    ("transfer: {action: {context: 0.5}}\n", "transfer.action.context=0.5 is out of range; allowed: >= 1"),
    ("transfer: {scene: {momentum: 1.5}}\n", "transfer.scene.momentum=1.5 is out of range; allowed: >= 0 and < 1"),
    ("transfer: {detection: {bg_iou_low: 0.5}}\n", "transfer.detection: bg_iou_low (0.5) must be below bg_iou_high (0.5)"),
    ("- a\n- b\n", "must hold a YAML mapping"),
    ("a: [1,\n", "is not valid YAML"),
    ("", "holds no settings; a spec names the sweep (name:)"),
    ("# only a comment\n", "holds no settings"),
    ("{}\n", "holds no settings"),
])
def test_bad_specs_name_the_key(tmp_path, text, message):
    with pytest.raises(UserError, match=re.escape(message)):
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

