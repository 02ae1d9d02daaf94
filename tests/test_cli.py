"""The command line as a user meets it: one-line errors with a non-zero exit, nothing half-written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import tiny_spec


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


def test_missing_wordnet_says_how_to_install(tmp_path):
    code = ("import sys, nltk; nltk.data.path[:] = [sys.argv[1]];"
            "from itl_ray.cli import main; sys.exit(main(['labels', 'fine']))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert_one_line_error(done, "WordNet", "install")


def test_report_without_a_store_says_where_it_looked(tmp_path):
    done = itl_ray("report", cwd=tmp_path)
    assert_one_line_error(done, "does not exist", "itl_runs/mlflow.db", "MLFLOW_TRACKING_URI")
    assert not (tmp_path / "itl_runs").exists()
