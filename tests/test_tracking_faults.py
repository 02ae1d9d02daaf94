"""MLflow edge cases of a sweep, all settled before Ray starts: a resume with nothing to resume
writes nothing, a deleted experiment is named with how to restore or purge it, and writers that
open a fresh sqlite store together all get it (created and migrated once)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from itl_ray.cli import main
from itl_ray.errors import UserError
from itl_ray.tracking import Tracker, open_client
from tests.conftest import tiny_spec


def sweep_line(capsys, *args) -> tuple[int, list[str]]:
    """`itl-ray sweep ARGS` in this process: its exit code and its lines on stderr."""
    code = main(["sweep", *map(str, args)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_resume_without_an_earlier_sweep_writes_nothing(tmp_path, mini_paths, monkeypatch, capsys):
    import ray

    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'storage'}")
    db = tmp_path / "runs" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    # No store at all: refused, and no store, folder or storage made.
    code, lines = sweep_line(capsys, spec, "--resume")
    assert code == 2 and len(lines) == 1 and "--resume: no earlier sweep 'tiny'" in lines[0], lines
    assert not (tmp_path / "runs").exists() and not (tmp_path / "storage").exists()
    # A store with another experiment: refused, and no experiment 'tiny' left behind.
    Tracker("other")
    capsys.readouterr()
    code, lines = sweep_line(capsys, spec, "--resume")
    assert code == 2 and len(lines) == 1 and "--resume: no earlier sweep 'tiny'" in lines[0], lines
    client = open_client(f"sqlite:///{db}")
    assert client.get_experiment_by_name("tiny") is None
    assert not ray.is_initialized()


def test_a_deleted_experiment_is_named_with_its_remedy_before_ray_starts(tmp_path, mini_paths, monkeypatch, capsys):
    import ray

    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'storage'}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker("tiny")
    tracker.client.delete_experiment(tracker.experiment_id)
    capsys.readouterr()
    for args in ([spec], [spec, "--resume"]):
        code, lines = sweep_line(capsys, *args)
        assert code == 2 and len(lines) == 1, lines
        assert f"mlflow experiments restore --experiment-id {tracker.experiment_id}" in lines[0]
        assert f"mlflow gc --backend-store-uri {uri} --experiment-ids {tracker.experiment_id}" in lines[0]
    assert not ray.is_initialized()
    with pytest.raises(UserError, match="was deleted"):
        Tracker("tiny")
    # Restored as the line says, the experiment is used again (no second one).
    tracker.client.restore_experiment(tracker.experiment_id)
    assert Tracker("tiny").experiment_id == tracker.experiment_id


WRITER = """
import os, sys, time
from pathlib import Path
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
from itl_ray.tracking import Tracker
tracker = Tracker("together", sys.argv[1])
run = tracker.trial_run(f"trial{os.getpid()}", "writer", None)
tracker.log_metrics(run, {"value": 1.0})
tracker.finish(run)
"""


def test_writers_opening_a_fresh_store_together_all_succeed(tmp_path):
    """Four processes open the same new sqlite store at the same moment (each waits for one file to
    appear) and each writes a run: none dies in MLflow's migrations, and the store holds four."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(go)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    time.sleep(3)  # let every writer import and wait; the go file starts them together
    go.touch()
    outputs = [writer.communicate(timeout=300)[0] for writer in writers]
    for writer, output in zip(writers, outputs):
        assert writer.returncode == 0, output[-3000:]
    client = open_client(uri)
    experiment = client.get_experiment_by_name("together")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 4 and all(run.info.status == "FINISHED" for run in runs)
