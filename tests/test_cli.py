"""The command line as a user meets it: one-line errors with a non-zero exit, nothing half-written."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_spec
from tests.processes import ray_tmpdir  # noqa: F401 (a fixture)


def itl_ray(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "itl_ray.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def assert_one_line_error(done, *fragments):
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in done.stderr


def test_missing_spec(tmp_path):
    assert_one_line_error(itl_ray("sweep", str(tmp_path / "nope.yaml")), "nope.yaml", "does not exist")
    assert_one_line_error(itl_ray("sweep", str(tmp_path)), str(tmp_path), "is a folder", ".yaml")


def test_spec_not_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert_one_line_error(itl_ray("sweep", str(bad)), "bad.yaml", "not valid YAML")


def test_unknown_key_and_wrong_type(tmp_path, mini_paths):
    spec = tiny_spec(tmp_path / "s.yaml", mini_paths)
    assert_one_line_error(itl_ray("sweep", str(spec), "--set", "pretrain.epochz=1"), "pretrain.epochz")
    assert_one_line_error(itl_ray("sweep", str(spec), "--set", "pretrain.epochs=many"), "pretrain.epochs", "int")


@pytest.mark.parametrize("override, fragments", [
    ("grid.pretrain.images_per_class=[500]", ["images_per_class=500", "no chosen class has more than 12"]),
    ("data.imagenet=/no/such/folder", ["/no/such/folder", "does not exist"]),
    ("data.sun397=/tmp", ["data.sun397=/tmp is not a prepared dataset", "itl-ray prepare sun397"]),
])
def test_bad_data_fails_before_any_trial(tmp_path, mini_paths, override, fragments):
    spec = tiny_spec(tmp_path / "s.yaml", mini_paths, extra=f"storage: {tmp_path / 'runs'}")
    done = itl_ray("sweep", str(spec), "--set", override, cwd=tmp_path)
    assert_one_line_error(done, *fragments)
    assert not (tmp_path / "itl_runs").exists() and not (tmp_path / "runs").exists()


def test_dry_run_lists_trials(tmp_path, mini_paths):
    done = itl_ray("sweep", str(tiny_spec(tmp_path / "s.yaml", mini_paths)), "--dry-run")
    assert done.returncode == 0
    assert "2 trials" in done.stdout and "GPU-hours" in done.stdout
    assert "images_per_class=0" in done.stdout


def test_trial_command_without_tracking(tmp_path, mini_paths):
    spec = tiny_spec(tmp_path / "s.yaml", mini_paths)
    done = itl_ray("trial", str(spec), "--no-track", "--set", "pretrain.epochs=1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("pretrain_top1 ") and "sun397_acc" in last
    assert not (tmp_path / "itl_runs" / "mlflow.db").exists()


def test_synth_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.txt").write_text("mine")
    assert_one_line_error(itl_ray("synth", str(tmp_path / "x")), "not an itl_ray mini-benchmark")
    assert (tmp_path / "x" / "file.txt").read_text() == "mine"
    (tmp_path / "a_file").write_text("mine")
    assert_one_line_error(itl_ray("synth", str(tmp_path / "a_file" / "mini")), "cannot create",
                          f"{tmp_path / 'a_file'} is a file, not a folder")


def test_missing_wordnet_says_how_to_install(tmp_path):
    code = ("import sys, nltk; nltk.data.path[:] = [sys.argv[1]];"
            "from itl_ray.cli import main; sys.exit(main(['labels', 'fine']))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert_one_line_error(done, "WordNet", "install")


def test_report_without_a_store_says_where_it_looked(tmp_path):
    done = itl_ray("report", cwd=tmp_path)
    assert_one_line_error(done, "does not exist", "itl_runs/mlflow.db", "MLFLOW_TRACKING_URI")
    assert not (tmp_path / "itl_runs").exists()


# ---------------------------------------------------------------------------------------------
# Everything a trial will use is checked before Ray starts: one line, exit 2, nothing started
# ---------------------------------------------------------------------------------------------

def damaged_copy(source: str, folder: Path, what: str) -> str:
    """A copy of a prepared folder with one kind of damage."""
    import json
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(source, folder)
    if what == "truncated shard":
        shard = folder / "shards" / "shard-00000.arrow"
        shard.write_bytes(shard.read_bytes()[:1000])
    elif what == "missing manifest":
        (folder / "manifest.parquet").unlink()
    elif what == "partition 3 not prepared":  # as if Training_03/Testing_03 had not been there
        manifest = pq.read_table(folder / "manifest.parquet")
        splits = [",".join(s for s in split.split(",") if not s.endswith("_03"))
                  for split in manifest.column("split").to_pylist()]
        pq.write_table(manifest.set_column(manifest.column_names.index("split"), "split", pa.array(splits)),
                       folder / "manifest.parquet")
        info = json.loads((folder / "PREPARED.json").read_text())
        del info["content_hash"]
        (folder / "PREPARED.json").write_text(json.dumps(info))
    return str(folder)


BAD_INPUTS = [
    ("twice", [], ["spec file", "key 'pretrain' is given twice (lines", "keep one"]),
    ("empty", [], ["holds no settings; a spec names the sweep (name:)"]),
    ("", ["--set", "pretrain.lr=-1e-3"], ["pretrain.lr=-0.001 is out of range; allowed: > 0"]),
    ("", ["--set", "pretrain.momentum=-0.9"], ["pretrain.momentum=-0.9 is out of range"]),
    ("", ["--set", "pretrain.weight_decay=-5e-4"], ["pretrain.weight_decay=-0.0005 is out of range"]),
    ("", ["--set", "model.width=0"], ["model.width=0.0 is out of range; allowed: > 0"]),
    ("", ["--set", "model.width=-0.25"], ["model.width=-0.25 is out of range; allowed: > 0"]),
    ("", ["--set", "model.resolution=10"], ["model.resolution=10 is out of range; allowed: >= 39"]),
    ("", ["--set", "model.resolution=-64"], ["model.resolution=-64 is out of range; allowed: >= 39"]),
    ("", ["--set", "transfer.scene.partitions=[1, 11]"],
     ["transfer.scene.partitions[1]=11 is out of range; allowed: >= 1 and <= 10"]),
    ("", ["--set", "resources.cpus_per_trial=-2"], ["resources.cpus_per_trial=-2.0 is out of range; allowed: > 0"]),
    ("", ["--set", "max_failures=-1"], ["max_failures=-1 is out of range; allowed: >= 0"]),
    ("", ["--set", "runtime.pretrain.compile=yes"], ["runtime.pretrain.compile='yes' is not one of the choices"]),
    ("truncated shard", ["imagenet"], ["data.imagenet=", "shards/shard-00000.arrow is not a readable Arrow file",
                                       "itl-ray prepare imagenet ROOT OUT"]),
    ("missing manifest", ["voc2007"], ["data.voc2007=", "manifest.parquet is missing", "itl-ray prepare voc2007"]),
    ("partition 3 not prepared", ["sun397", "--set", "transfer.scene.partitions=[3]"],
     ["data.sun397=", "holds no partition 3", "transfer.scene.partitions"]),
]


@pytest.mark.parametrize("case, args, fragments", BAD_INPUTS, ids=[
    f"{case or args[1]}" for case, args, _ in BAD_INPUTS])
def test_bad_input_is_refused_before_ray_or_mlflow_start(tmp_path, mini_paths, monkeypatch, capsys, ray_tmpdir,
                                                         case, args, fragments):
    """`itl-ray sweep` (and `itl-ray trial` for the data) in this process: exit code 2, one line,
    and nothing started: no Ray instance, no MLflow store, no storage, no trial folder."""
    from itl_ray.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = tiny_spec(tmp_path / "s.yaml", mini_paths, extra=f"storage: {tmp_path / 'runs'}")
    if case == "twice":
        spec.write_text(spec.read_text() + "pretrain: {epochs: 5}\n")
    elif case == "empty":
        spec.write_text("# nothing yet\n")
    commands = [["sweep"], ["sweep", "--dry-run"]] if case in ("", "twice", "empty") else [["sweep"], ["trial", "--no-track"]]
    if case and case not in ("twice", "empty"):
        setting, *args = args
        copy = damaged_copy(mini_paths[setting], tmp_path / f"damaged-{setting}", case)
        args = ["--set", f"data.{setting}={copy}", *args]
    for command in commands:
        code = main([command[0], str(spec), *command[1:], *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (command, err)
        for fragment in fragments:
            assert fragment in err[0], (command, err[0])
    assert not (tmp_path / "itl_runs").exists() and not (tmp_path / "runs").exists()  # no MLflow store, no trial
    assert not any(ray_tmpdir.iterdir())  # no Ray session was started
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized()


def test_a_key_given_twice_through_the_command(tmp_path, mini_paths):
    spec = tiny_spec(tmp_path / "s.yaml", mini_paths)
    spec.write_text(spec.read_text() + "pretrain: {epochs: 5, batch_size: 4}\n")
    lines = [number for number, line in enumerate(spec.read_text().splitlines(), 1) if line.startswith("pretrain:")]
    done = itl_ray("sweep", str(spec), "--dry-run", cwd=tmp_path)
    assert done.returncode == 2 and len(lines) == 2
    assert_one_line_error(done, f"key 'pretrain' is given twice (lines {lines[0]} and {lines[1]})")
def test_version_names_the_project_and_its_libraries():
    from itl_ray import __version__

    done = itl_ray("--version")
    assert done.returncode == 0
    line = done.stdout.strip()
    assert line.startswith(f"itl-ray {__version__} (Python ") and "torch 2.14.1" in line and "mlflow" in line


def test_every_command_has_a_description_an_example_and_its_defaults():
    from itl_ray.cli import COMMANDS, get_args_parser

    parser = get_args_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert set(commands.choices) == set(COMMANDS)
    top = itl_ray("--help")
    assert top.returncode == 0 and "itl-ray sweep sweeps/smoke.yaml" in top.stdout
    for name, sub in commands.choices.items():
        done = itl_ray(name, "--help")
        assert done.returncode == 0, name
        text = " ".join(done.stdout.split())  # argparse wraps help lines
        paragraphs = done.stdout.split("\n\n")[1:]  # after the usage line, before the arguments
        description = " ".join(p for p in paragraphs if not p.startswith(("positional arguments:", "options:"))
                               and not p.startswith("examples:"))
        assert len(description.split()) >= 15, (name, description)
        assert f"examples: itl-ray {name} " in text, name
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                shown = " ".join((sub.formatter_class(prog="x")._get_help_string(action) or "").split())
                assert "default" in shown, (name, action.option_strings)
                assert " ".join(shown.split("%(default)s")[0].split()) in text, (name, action.option_strings)


def test_a_reader_that_leaves_the_pipe_ends_the_command_quietly(tmp_path, mini_paths):
    spec = tiny_spec(tmp_path / "s.yaml", mini_paths)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader left before the first line (`itl-ray ... | true`)
    try:
        done = subprocess.run([sys.executable, "-m", "itl_ray.cli", "sweep", str(spec), "--dry-run"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (128 + signal.SIGPIPE, "")


@pytest.mark.parametrize("args, fragments", [
    (["bench", "--device", "tpu"], ["itl-ray bench", "invalid choice: 'tpu'", "`itl-ray bench --help`"]),
    (["sweep", "s.yaml", "--img-per-s", "abc"], ["itl-ray sweep", "--img-per-s", "abc", "`itl-ray sweep --help`"]),
    (["nosuch"], ["itl-ray", "invalid choice: 'nosuch'", "`itl-ray --help`"]),
    (["prepare", "sun397"], ["itl-ray prepare", "required", "`itl-ray prepare --help`"]),
])
def test_a_command_line_argparse_cannot_read_is_one_line(tmp_path, args, fragments):
    assert_one_line_error(itl_ray(*args, cwd=tmp_path), *fragments)
