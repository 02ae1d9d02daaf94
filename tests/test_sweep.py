"""A real 2-trial sweep through Ray Tune into a sqlite MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_spec

pytestmark = pytest.mark.filterwarnings("ignore")


def test_resume_without_an_earlier_sweep_says_so(tmp_path, mini_paths):
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'runs'}")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'Y.db'}"}
    done = subprocess.run([sys.executable, "-m", "itl_ray.cli", "sweep", str(spec), "--resume"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "--resume: no earlier sweep 'tiny'" in done.stderr


def test_sweep_runs_two_trials_into_mlflow(tmp_path, mini_paths):
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'runs'}")
    db = tmp_path / "X.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    done = subprocess.run([sys.executable, "-m", "itl_ray.cli", "sweep", str(spec)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for metric in ("pretrain_top1", "voc07_det_map", "voc12_act_map", "sun397_acc"):
        assert metric in done.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("itl.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("itl.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED"
        for param in ("num_classes", "images_per_class", "label_set", "seed", "subset_hash"):
            assert param in child.data.params
        # The metrics in MLflow are the ones the trial computed: its results in its latest checkpoint.
        stages = json.loads((Path(child.data.tags["itl.checkpoint"]) / "stages.json").read_text())
        assert set(stages) == {"pretrain", "detection", "action", "scene"}
        computed = {key: value for stage in stages.values() for key, value in stage.items()}
        for metric in ("pretrain_top1", "voc07_det_map", "voc12_act_map", "sun397_acc"):
            assert 0.0 <= child.data.metrics[metric] <= 100.0
            assert child.data.metrics[metric] == computed[metric]
    control = [c for c in children if c.data.params["images_per_class"] == "0"]
    assert len(control) == 1 and control[0].data.params["subset_hash"] == "none"
    pretrained = [c for c in children if c.data.params["images_per_class"] == "8"][0]
    # Curves, step = iteration: the tiny spec's trial takes 2 epochs of 2 iterations (loss at each,
    # validation at each epoch's end).
    history = client.get_metric_history(pretrained.info.run_id, "pretrain/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    history = client.get_metric_history(pretrained.info.run_id, "pretrain/val_top1")
    assert sorted(m.step for m in history) == [2, 4]

    # --resume continues the same parent run: finished stages are skipped, no run is duplicated.
    again = subprocess.run([sys.executable, "-m", "itl_ray.cli", "sweep", str(spec), "--resume"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "pretrain: done earlier" in again.stdout + again.stderr
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert len(runs) == 3
    assert {r.info.run_id for r in runs if r.data.tags.get("itl.role") == "trial"} == {c.info.run_id for c in children}
    resumed = client.get_run(pretrained.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.metrics["voc07_det_map"] == pretrained.data.metrics["voc07_det_map"]

    # Each trial run names its experiment and point; the parent run keeps the plan.
    for child in children:
        assert child.data.params["experiment"] == "tiny" and child.data.tags["itl.experiments"] == "tiny"
        assert child.data.tags["itl.point"] and "seed" not in child.data.tags["itl.point"]
    plan_file = client.download_artifacts(parents[0].info.run_id, "sweep_plan.json", str(tmp_path))
    plan = __import__("json").loads(open(plan_file).read())
    assert sorted(trial["trial_id"] for trial in plan) == sorted(c.data.tags["itl.trial_id"] for c in children)

    # The analysis script reads the same store back into the experiment's table.
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    report = subprocess.run([sys.executable, str(repo / "analysis" / "report.py"), "--experiment", "tiny",
                             "--out", str(tmp_path / "report"), "--resamples", "50"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    import csv

    with open(tmp_path / "report" / "tiny.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    assert rows[-1]["images_per_class"] == "0"  # the control comes last
    assert float(rows[0]["pretrain_top1_mean"]) == pretrained.data.metrics["pretrain_top1"]
    assert rows[0]["pretrain_top1_n"] == "1"
    assert (tmp_path / "report" / "report.html").is_file() and (tmp_path / "report" / "tiny.png").is_file()
