from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

from typing import Annotated, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from itl_ray.bounds import Ge, Interval, MaxLen

from itl_ray.config import TrialConfig, load_spec, override, parse_overrides, to_dict, trial_id
from itl_ray.errors import UserError
from itl_ray.prepare import PrepareSettings, prepare
from tests.conftest import tiny_spec


def write(tmp_path, text):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_spec_grid_and_extra_trials(tmp_path, mini_paths):
    data = {f"data.{setting}": path for setting, path in mini_paths.items()}
    spec = load_spec(write(tmp_path, """
name: s
pretrain: {epochs: 3}
grid:
  pretrain.num_classes: [10, 40]
  pretrain.images_per_class: [40, 120]
extra_trials:
  - {pretrain.images_per_class: 0}
"""), data)
    trials = spec.trials()
    assert [(t.pretrain.num_classes, t.pretrain.images_per_class) for t in trials] == [
        (10, 40), (10, 120), (40, 40), (40, 120), (None, 0)]
    assert all(t.pretrain.epochs == 3 and t.name == "s" for t in trials)
    assert len({trial_id(t) for t in trials}) == 5
    relative = load_spec(write(tmp_path, "name: s\ndata: {imagenet: here/imagenet}\n")).trial
    assert relative.data.imagenet == os.path.join(os.getcwd(), "here", "imagenet")  # relative paths made absolute


def test_overrides_are_typed(tmp_path):
    spec = load_spec(write(tmp_path, "name: s\n"), parse_overrides(["pretrain.lr=0.5", "model.width=1", "data.imagenet=/x"]))
    assert spec.trial.pretrain.lr == 0.5 and spec.trial.model.width == 1.0 and spec.trial.data.imagenet == "/x"
    assert isinstance(spec.trial.model.width, float)
    spec_text = "name: s\ngrid: {pretrain.lr: [0.1, 0.2]}\nextra_trials: [{seed: 1}]\n"
    merged = load_spec(write(tmp_path, spec_text), parse_overrides(["grid={seed: [3]}"]))
    assert merged.grid == {"pretrain.lr": [0.1, 0.2], "seed": [3]}  # a mapping merges into the grid
    cleared = load_spec(write(tmp_path, spec_text), parse_overrides(["grid={}"]))
    assert cleared.grid == {} and [t.seed for t in cleared.trials()] == [1]  # an empty one clears it


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
pretrain: {lr: 1e-3, weight_decay: 5e-4, label_set: fine, num_classes: null}
runtime: {pretrain: {compile: off, channels_last: on}}
model: {width: 1, resolution: 64}
transfer:
  detection: {window_sizes: [1e-1, .5], box_target_stds: [0.1, 0.1, 0.2, 2e-1]}
grid:
  pretrain.momentum: [0, 9e-1]
"""))
    pre, runtime = spec.trial.pretrain, spec.trial.runtime.pretrain
    assert (pre.lr, pre.weight_decay, pre.num_classes) == (0.001, 0.0005, None)
    assert (runtime.compile, runtime.channels_last) == ("off", "on")
    assert spec.trial.name == "no" and spec.trial.seed == 7 and spec.trial.model.width == 1.0
    assert spec.trial.transfer.detection.window_sizes == (0.1, 0.5)
    assert spec.trial.transfer.detection.box_target_stds == (0.1, 0.1, 0.2, 0.2)
    assert spec.grid == {"pretrain.momentum": [0.0, 0.9]}
    assert [t.pretrain.momentum for t in spec.trials()] == [0.0, 0.9]
    # The same from --set, and a quoted number given to a text field stays text.
    spec = load_spec(write(tmp_path, "name: '2024'\n"), parse_overrides(
        ["pretrain.lr=1e-3", "runtime.pretrain.compile=off", "pretrain.label_set=no",
         "grid.pretrain.weight_decay=[5e-4, 0]"]))
    assert spec.trial.name == "2024" and spec.trial.pretrain.lr == 0.001 and spec.trial.runtime.pretrain.compile == "off"
    assert spec.trial.pretrain.label_set == "no"
    assert spec.grid == {"pretrain.weight_decay": [0.0005, 0.0]}
    # Unquoted numbers and booleans are text to a text field too: they never become numbers or booleans.
    spec = load_spec(write(tmp_path, "name: 2024\npretrain: {label_set: yes}\n"))
    assert spec.trial.name == "2024" and spec.trial.pretrain.label_set == "yes"


@pytest.mark.parametrize("text, message", [
    ("pretrain: {epoch: 3}\n", "unknown key 'pretrain.epoch'"),
    ("bogus: 1\n", "unknown key 'bogus'; known keys here: data, description, experiment, experiments, extra_trials, "
                    "grid, max_concurrent_trials, max_failures, model, name, pretrain, resources, runtime, seed, seeds, "
                    "storage, transfer"),
    ("pretrain: {epochs: three}\n", "pretrain.epochs: expected int (a whole number), got 'three'"),
    ("pretrain: {epochs: 2.5}\n", "pretrain.epochs: expected int (a whole number), got '2.5'"),
    ("pretrain: {lr: .inf}\n", "pretrain.lr: expected float"),
    ("model: {width: [1]}\n", "model.width: expected float"),
    ("transfer: {scene: {lr: x}}\n", "transfer.scene.lr: expected float"),
    ("grid: {pretrain.bogus: [1]}\n", "grid: unknown key 'pretrain.bogus'"),
    ("grid: {pretrain.lr: []}\n", "grid.pretrain.lr=[] is out of range; allowed: not empty"),
    ("grid: {pretrain.epochs: [1, x]}\n", "grid.pretrain.epochs[1]: expected int"),
    ("grid: {pretrain.epochs: [1, 2, 1]}\n", "grid.pretrain.epochs lists 1 twice ([1, 2, 1]); list each value once"),
    ("extra_trials: [{pretrain.lr: -1}]\n", "extra_trials[0].pretrain.lr=-1.0 is out of range; allowed: > 0"),
    ("pretrain: {images_per_class: -1}\n", "pretrain.images_per_class=-1 is out of range; allowed: >= 0"),
    ("pretrain: {lr: -0.01}\n", "pretrain.lr=-0.01 is out of range; allowed: > 0"),
    ("pretrain: {momentum: -0.9}\n", "pretrain.momentum=-0.9 is out of range; allowed: >= 0 and < 1"),
    ("pretrain: {weight_decay: -5e-4}\n", "pretrain.weight_decay=-0.0005 is out of range; allowed: >= 0"),
    ("runtime: {pretrain: {compile: yes}}\n", "runtime.pretrain.compile='yes' is not one of the choices: auto, on, off"),
    ("model: {resolution: 38}\n", "model.resolution=38 is out of range; allowed: >= 39"),
    ("model: {resolution: 10}\n", "model.resolution=10 is out of range; allowed: >= 39"),
    ("model: {resolution: -64}\n", "model.resolution=-64 is out of range; allowed: >= 39"),
    ("model: {width: 0}\n", "model.width=0.0 is out of range; allowed: > 0"),
    ("model: {width: -0.25}\n", "model.width=-0.25 is out of range; allowed: > 0"),
    ("model: {width: 1e9}\n", "model.width=1000000000.0 is out of range; allowed: > 0 and <= 8"),
    ("model: {resolution: 100000}\n", "model.resolution=100000 is out of range; allowed: >= 39 and <= 1024"),
    ("pretrain: {batch_size: 100000000}\n", "pretrain.batch_size=100000000 is out of range; allowed: >= 1 and <= 65536"),
    ("transfer: {scene: {partitions: [11]}}\n", "transfer.scene.partitions[0]=11 is out of range; allowed: >= 1 and <= 10"),
    ("transfer: {scene: {partitions: [1, 0]}}\n", "transfer.scene.partitions[1]=0 is out of range; allowed: >= 1 and <= 10"),
    ("transfer: {scene: {partitions: []}}\n", "transfer.scene.partitions=[] is out of range; allowed: not empty"),
    ("transfer: {scene: {partitions: [2, 2]}}\n", "transfer.scene: partitions lists a partition twice: [2, 2]"),
    ("data: {sun397_partition: 2}\n", "unknown key 'data.sun397_partition' (it is transfer.scene.partitions now)"),
    ("model: {variant: alexnet}\n", "model.variant='alexnet' is not one of the choices: bvlc_reference_caffenet, "
                                     "bvlc_alexnet"),
    ("model: {init: xavier}\n", "model.init='xavier' is not one of the choices: caffe, kaiming"),
    ("data: {imagenet: ''}\n", "data.imagenet='' is out of range; allowed: not empty"),
    ("seed: -1\n", "seed=-1 is out of range; allowed: >= 0"),
    ("resources: {cpus_per_trial: -1}\n", "resources.cpus_per_trial=-1.0 is out of range; allowed: > 0"),
    ("resources: {gpus_per_trial: -1}\n", "resources.gpus_per_trial=-1.0 is out of range; allowed: >= 0"),
    ("max_failures: -1\n", "max_failures=-1 is out of range; allowed: >= 0"),
    ("max_concurrent_trials: -2\n", "max_concurrent_trials=-2 is out of range; allowed: >= 0"),
    ("transfer: {action: {crops: {context: 0.5}}}\n", "transfer.action.crops.context=0.5 is out of range; allowed: >= 1"),
    ("transfer: {action: {context: 1.5}}\n",
     "unknown key 'transfer.action.context' (it is transfer.action.crops.context now)"),
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


def with_data(config: TrialConfig, paths: dict[str, str]) -> TrialConfig:
    return dataclasses.replace(config, data=dataclasses.replace(config.data, **paths))


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
    assert len({json.dumps(to_dict(p.config)) for p in planned}) == len(planned) == len(spec.trials())
    assert spec.experiment_names() == ["images_per_class", "split", "budget"]
    assert spec.varying_keys()[-1] == "seed"


def test_one_experiment_is_named_after_the_sweep_and_seeds_apply(tmp_path):
    spec = load_spec(write(tmp_path, "name: My Sweep\nseeds: [3, 4]\ngrid: {pretrain.epochs: [1, 2]}\n"))
    assert spec.experiment_names() == ["my_sweep"]
    assert [(t.pretrain.epochs, t.seed) for t in spec.trials()] == [(1, 3), (1, 4), (2, 3), (2, 4)]
    only_listed = load_spec(write(tmp_path, "name: s\nextra_trials: [{pretrain.epochs: 7}]\n"))
    assert [t.pretrain.epochs for t in only_listed.trials()] == [7]  # no grid: the listed trials only


@pytest.mark.parametrize("text, message", [
    ("experiments: {a: {grid: {pretrain.epochs: [1]}}}\ngrid: {seed: [1]}\n", "grid: a spec has either a top-level grid or experiments, not both"),
    ("experiments: {Bad-Name: {grid: {pretrain.epochs: [1]}}}\n", "experiments.Bad-Name: an experiment name"),
    ("experiments: {a: {}}\n", "experiments.a: no trials"),
    ("experiments: {a: {grid: {pretrain.epochs: []}}}\n", "experiments.a.grid.pretrain.epochs=[] is out of range; allowed: not empty"),
    ("experiments: {a: {trials: [{pretrain.epochs: x}]}}\n", "experiments.a.trials[0].pretrain.epochs: expected int"),
    ("experiments: {a: {grid: {pretrain.epochs: [1, x]}}}\n", "experiments.a.grid.pretrain.epochs[1]: expected int"),
    ("grid: {pretrain.epochs: [1]}\nexperiments: {a: {grid: {pretrain.lr: [0.1]}}}\n",
     "a top-level grid or experiments, not both; this one has the grid over pretrain.epochs and the experiments a"),
    ("experiments: {a: {grid: {pretrain.epochz: [1]}}}\n", "experiments.a.grid: unknown key 'pretrain.epochz'"),
    ("experiments: {a: {grid: {runtime.threads: [1, 2]}}}\n", "experiments.a.grid.runtime.threads: runtime settings"),
    ("experiments: {a: {trials: [{seed: 1}], settings: {pretrain.lr: -1}}}\n",
     "experiments.a.settings.pretrain.lr=-1.0 is out of range"),
    ("seeds: [0, -1]\n", "seeds[1]=-1 is out of range; allowed: >= 0"),
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


def test_trial_id_is_stable(mini_paths):
    config = with_data(TrialConfig(), mini_paths)
    assert trial_id(config) == trial_id(with_data(TrialConfig(), mini_paths))
    assert trial_id(dataclasses.replace(config, seed=1)) != trial_id(config)
    # 12 hex digits, the same in another process with another hash seed (it names MLflow runs).
    code = ("import dataclasses, json, sys; from itl_ray.config import TrialConfig, trial_id; "
            "c = TrialConfig(seed=3); "
            "print(trial_id(dataclasses.replace(c, data=dataclasses.replace(c.data, **json.loads(sys.argv[1])))))")
    other = subprocess.run([sys.executable, "-c", code, json.dumps(mini_paths)], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": "7"}).stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", other) and other == trial_id(dataclasses.replace(config, seed=3))


def test_trial_id_ignores_runtime_settings(mini_paths):
    """Workers, threads, device, compile, test batch size: how fast, not what. A sweep resumed with
    other values finds its trials again."""
    base = with_data(TrialConfig(), mini_paths)
    faster = override(base, {"runtime.threads": 7, "runtime.device": "cpu", "runtime.pretrain.workers": 12,
                             "runtime.pretrain.prefetch": 9, "runtime.pretrain.cache_gib": 0,
                             "runtime.pretrain.cpu_decode_share": 0.25, "runtime.pretrain.channels_last": "on",
                             "runtime.pretrain.compile": "off", "runtime.detection.test_batch_size": 1,
                             "runtime.scene.cache_gib": 0, "runtime.induction.batch_size": 3,
                             "runtime.induction.classes_per_chunk": 2})
    assert faster.runtime != base.runtime and trial_id(faster) == trial_id(base)
    for key, value in (("pretrain.lr", 0.02), ("pretrain.precision", "fp32"), ("pretrain.pipeline", "torchvision"),
                       ("transfer.detection.nms_iou", 0.4), ("transfer.scene.partitions", [2]), ("model.width", 0.5),
                       ("model.variant", "bvlc_alexnet"), ("model.init", "kaiming"),
                       ("pretrain.subset_schedule", "scaled"), ("transfer.induction.enabled", True)):
        assert trial_id(override(base, {key: value})) != trial_id(base), key


def test_trial_id_names_data_by_content_not_path(mini_paths, raw_paths, tmp_path):
    base = with_data(TrialConfig(), mini_paths)
    moved = tmp_path / "elsewhere" / "sun397"
    shutil.copytree(mini_paths["sun397"], moved)
    assert trial_id(with_data(base, {"sun397": str(moved)})) == trial_id(base)
    # The same images stored in shards of another size: the same content.
    reshard = tmp_path / "reshard"
    prepare("sun397", raw_paths["sun397"], reshard, PrepareSettings(short_side=256, shard_size=7), workers=1)
    assert trial_id(with_data(base, {"sun397": str(reshard)})) == trial_id(base)
    # Other stored images (another size) or other labels: other content, another trial.
    smaller = tmp_path / "smaller"
    prepare("sun397", raw_paths["sun397"], smaller, PrepareSettings(short_side=64), workers=1)
    assert trial_id(with_data(base, {"sun397": str(smaller)})) != trial_id(base)
    relabelled = tmp_path / "relabelled"
    shutil.copytree(mini_paths["sun397"], relabelled)
    manifest = pq.read_table(relabelled / "manifest.parquet")
    labels = manifest.column("label").to_pylist()
    labels[0] = labels[-1]
    pq.write_table(manifest.set_column(manifest.column_names.index("label"), "label", pa.array(labels)),
                   relabelled / "manifest.parquet")
    info = json.loads((relabelled / "PREPARED.json").read_text())
    del info["content_hash"]  # as a folder prepared before content hashes were recorded
    (relabelled / "PREPARED.json").write_text(json.dumps(info))
    assert trial_id(with_data(base, {"sun397": str(relabelled)})) != trial_id(base)


def test_an_older_prepared_folder_gets_the_same_hash_computed_and_nothing_written(mini_paths, tmp_path):
    from itl_ray.config import data_hash

    older = tmp_path / "older"
    shutil.copytree(mini_paths["voc2012"], older)
    info = json.loads((older / "PREPARED.json").read_text())
    recorded = info.pop("content_hash")
    (older / "PREPARED.json").write_text(json.dumps(info))
    before = {path: path.stat().st_mtime_ns for path in older.rglob("*")}
    assert data_hash(str(older), "voc2012-action", "data.voc2012") == recorded
    assert {path: path.stat().st_mtime_ns for path in older.rglob("*")} == before


def test_sweep_id_ignores_runtime_settings(mini_paths, tmp_path):
    from itl_ray.sweep import sweep_id

    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths)
    plain = load_spec(spec)
    faster = load_spec(spec, parse_overrides(["runtime.pretrain.workers=3", "runtime.threads=2"]))
    assert sweep_id(plain) == sweep_id(faster)
    assert sweep_id(load_spec(spec, parse_overrides(["pretrain.lr=0.5"]))) != sweep_id(plain)


@pytest.mark.parametrize("text, message", [
    ("threads: 2\n", "unknown key 'threads' (it is runtime.threads now)"),
    ("device: cpu\n", "unknown key 'device' (it is runtime.device now)"),
    ("pretrain: {workers: 2}\n", "unknown key 'pretrain.workers' (it is runtime.pretrain.workers now)"),
    ("transfer: {detection: {test_batch_size: 2}}\n",
     "unknown key 'transfer.detection.test_batch_size' (it is runtime.detection.test_batch_size now)"),
    ("grid: {pretrain.compile: [on, off]}\n", "grid: unknown key 'pretrain.compile' (it is runtime.pretrain.compile now)"),
    ("grid: {runtime.pretrain.workers: [1, 2]}\n", "grid.runtime.pretrain.workers: runtime settings change how fast"),
    ("runtime: {device: gpu}\n", "runtime.device='gpu' is not one of the choices: auto, cpu, cuda"),
    ("runtime: {threads: -1}\n", "runtime.threads=-1 is out of range; allowed: >= 0"),
    ("runtime: {detection: {test_batch_size: 0}}\n", "runtime.detection.test_batch_size=0 is out of range"),
])
def test_runtime_settings_live_in_their_section(tmp_path, text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_spec(write(tmp_path, "name: s\n" + text))


def test_the_config_does_not_import_the_data_generator():
    """The config learns where prepared data lies from itl_ray.shards; the generator (and WordNet)
    stay out of every process that only reads a spec."""
    import ast

    code = "import sys, itl_ray.config; print(sorted(m for m in sys.modules if m.startswith('itl_ray.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = ast.literal_eval(done.stdout)
    assert "itl_ray.shards" in loaded
    assert "itl_ray.datasets.synthetic" not in loaded and "itl_ray.wordnet" not in loaded
    assert TrialConfig().data.voc2012.endswith("data/mini-shards/voc2012-action")  # prepare's kind as folder



@dataclasses.dataclass(frozen=True)
class Section:
    """A section with a field of every kind the validator knows."""

    flag: bool = False
    word: str = "x"
    count: Annotated[int, Ge(0)] = 0
    rate: float = 0.5
    level: Literal[1, 2, 3] = 1
    sizes: Annotated[tuple[Annotated[int, Interval(ge=1, le=9)], ...], MaxLen(3)] = (1,)
    maybe: Annotated[float, Ge(0)] | None = None
    names: list[str] = dataclasses.field(default_factory=list)


def test_the_validator_converts_by_declaration():
    """The one validator on a section of every kind of field: booleans only from true/false, text
    stays text, numbers from their YAML 1.2 spellings, choices of any type, bounds on items."""
    from itl_ray.config import from_dict, read_yaml

    def load(text):
        return from_dict(Section, read_yaml(text, "test"), "s")

    got = load("{flag: true, word: off, count: '7', rate: 1E3, level: 2, sizes: [3, 9], maybe: ~, names: [yes, 1.10]}")
    assert got == Section(True, "off", 7, 1000.0, 2, (3, 9), None, ["yes", "1.10"])
    assert load("{flag: False, rate: -.5, maybe: 2}") == Section(flag=False, rate=-0.5, maybe=2.0)
    for text, message in (
        ("{flag: yes}", "s.flag: expected true or false, got 'yes'"),
        ("{flag: on}", "s.flag: expected true or false, got 'on'"),
        ("{word: null}", "s.word: expected str (text), got null"),
        ("{count: 0x10}", "s.count: expected int (a whole number), got '0x10'"),
        ("{count: -1}", "s.count=-1 is out of range; allowed: >= 0"),
        ("{rate: .nan}", "s.rate: expected float"),
        ("{rate: 1_000}", "s.rate: expected float"),
        ("{level: 4}", "s.level='4' is not one of the choices: 1, 2, 3"),
        ("{sizes: [1, 2, 3, 4]}", "s.sizes=[1, 2, 3, 4] is out of range; allowed: at most 3 items"),
        ("{sizes: [0]}", "s.sizes[0]=0 is out of range; allowed: >= 1 and <= 9"),
        ("{maybe: -1}", "s.maybe=-1.0 is out of range; allowed: >= 0"),
        ("{names: word}", "s.names: expected a list, got 'word'"),
    ):
        with pytest.raises(UserError, match=re.escape(message)):
            load(text)
