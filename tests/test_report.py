"""`itl-ray report` on MLflow stores with known runs: the tables (means, stds, missing cells,
partial sweeps), the intervals and their reasons, the files and the page, the bad inputs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from itl_ray.tracking import EXPERIMENTS, POINT, POINT_ID, Reader, Tracker

REPO = Path(__file__).resolve().parents[1]


def scene_scores(folder: Path, right: np.ndarray) -> None:
    """Per-image SUN397 predictions: 120 images of 4 scenes, right where ``right`` is True."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.array(["/a/abbey", "/b/beach", "/k/kitchen", "/o/office"])[np.arange(120) % 4]
    pd.DataFrame({"image_id": [f"{i:04d}" for i in range(120)], "label": labels,
                  "prediction": np.where(right, labels, np.roll(labels, 1))}).to_parquet(
        folder / "sun397_predictions.parquet", index=False)


def make_store(tmp_path: Path, trials: list[dict], name: str = "study", finished: bool = True,
               plan_extra: list[dict] = ()) -> str:
    """A store as a sweep leaves it: one parent run with its plan, one run per trial with the
    experiment tags, params and the given final metrics (and per-image scores where given)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(name, uri)
    parent = tracker.sweep_run("sweep-id", name, resume=False)
    plan = []
    for trial in trials:
        point = trial["point"]
        tid = f"{point}-s{trial['seed']}"
        plan.append({"trial_id": tid, "name": tid, "experiments": trial["experiments"], "point": point,
                     "point_id": point, "seed": trial["seed"]})
        run = tracker.trial_run(tid, tid, parent, tags={EXPERIMENTS: ",".join(trial["experiments"]), POINT: point,
                                                         POINT_ID: point})
        tracker.log_params(run, {"label_set": trial.get("label_set", "fine"), "num_classes": trial.get("classes", 40),
                                 "source_classes": trial.get("classes", 40), "images_per_class": trial["per_class"],
                                 "pretrain_images": trial.get("classes", 40) * trial["per_class"],
                                 "seed": trial["seed"], "experiment": ",".join(trial["experiments"])})
        tracker.log_metrics(run, trial["metrics"])
        if "right" in trial:
            scene_scores(tmp_path / "scratch" / tid, trial["right"])
            tracker.client.log_artifacts(run, str(tmp_path / "scratch" / tid), "per_image")
        tracker.finish(run)
    tracker.log_plan(parent, plan + list(plan_extra))
    if finished:
        tracker.finish(parent)
    return uri


def metrics(det: float | None, act: float, sun: float, top1: float = 50.0) -> dict:
    values = {"pretrain_top1": top1, "voc12_act_map": act, "sun397_acc": sun}
    if det is not None:
        values["voc07_det_map"] = det
    return values


@pytest.fixture
def known_store(tmp_path, monkeypatch):
    """images_per_class: 150 (seeds 0, 1), 30 (seeds 0, 1; seed 1 has no detection mAP), 12 (seed 0 of
    two planned, no detection mAP) and the control (seed 0); per-image scene scores for 150 and 30."""
    rng = np.random.default_rng(0)
    better = rng.random(120) < 0.9
    worse = better & (rng.random(120) < 0.5)  # right on a subset of the images the better trial gets right
    trials = [
        {"experiments": ["images_per_class"], "point": "ipc150", "per_class": 150, "seed": 0,
         "metrics": metrics(10.0, 30.0, 40.0), "right": better},
        {"experiments": ["images_per_class"], "point": "ipc150", "per_class": 150, "seed": 1,
         "metrics": metrics(12.0, 32.0, 44.0), "right": better},
        {"experiments": ["images_per_class"], "point": "ipc30", "per_class": 30, "seed": 0,
         "metrics": metrics(6.0, 20.0, 30.0), "right": worse},
        {"experiments": ["images_per_class"], "point": "ipc30", "per_class": 30, "seed": 1,
         "metrics": metrics(None, 24.0, 31.0), "right": worse},
        {"experiments": ["images_per_class"], "point": "ipc12", "per_class": 12, "seed": 0,
         "metrics": metrics(None, 15.0, 20.0)},
        {"experiments": ["images_per_class"], "point": "control", "per_class": 0, "seed": 0,
         "metrics": metrics(1.0, 10.0, 5.0, top1=2.5)},
    ]
    missing = [{"trial_id": "ipc12-s1", "name": "ipc12-s1", "experiments": ["images_per_class"], "point": "ipc12",
                "point_id": "ipc12", "seed": 1}]
    uri = make_store(tmp_path, trials, plan_extra=missing)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def test_the_table_holds_means_stds_and_missing_cells(known_store, tmp_path):
    from itl_ray.report import report

    page = report("study", tmp_path / "out", resamples=200, log=lambda line: None)
    with open(tmp_path / "out" / "images_per_class.csv") as handle:
        rows = {row["point_id"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["ipc150", "ipc30", "ipc12", "control"]  # most images first, the control last
    assert float(rows["ipc150"]["voc07_det_map_mean"]) == 11.0
    assert float(rows["ipc150"]["voc07_det_map_std"]) == pytest.approx(np.std([10.0, 12.0], ddof=1))
    assert rows["ipc150"]["voc07_det_map_n"] == "2"
    assert float(rows["ipc30"]["voc07_det_map_mean"]) == 6.0 and rows["ipc30"]["voc07_det_map_n"] == "1"
    assert rows["ipc30"]["voc07_det_map_std"] == ""  # one value: no standard deviation, not 0
    assert float(rows["ipc30"]["sun397_acc_mean"]) == 30.5
    assert rows["ipc12"]["runs"] == "1" and rows["ipc12"]["planned"] == "2"
    assert rows["ipc12"]["voc07_det_map_n"] == "0" and rows["ipc12"]["voc07_det_map_mean"] == ""

    text = (tmp_path / "out" / "images_per_class.md").read_text()
    assert "11.0 ± 1.4 (n=2)" in text
    assert "6.0 (n=1 of 2)" in text  # ipc30: seed 1 has no detection mAP
    assert "20.0 (n=1 of 2)" in text  # ipc12: seed 1 never ran
    twelve = [line for line in text.splitlines() if line.startswith("| 12 images/class")][0]
    assert "| missing " in twelve  # no detection mAP at all: missing, not 0
    assert "control: random init" in text
    assert "PARTIAL" in text  # 6 of 7 planned trials

    # The comparisons: 30 vs 150 images per class on SUN397 has per-image scores on both sides and
    # the smaller subset is right on a subset of the images: significantly lower.
    with open(tmp_path / "out" / "images_per_class_comparisons.csv") as handle:
        compared = {(row["comparison"], row["metric"]): row for row in csv.DictReader(handle)}
    sun = compared[("30 vs 150 images per class", "sun397_acc")]
    assert float(sun["difference"]) == pytest.approx(30.5 - 42.0)
    assert float(sun["images_high"]) < 0 and sun["images_verdict"] == "A lower"
    assert sun["seeds_low"] != "" and float(sun["seeds_low"]) < float(sun["seeds_high"])
    # Detection has no per-image scores: left out, with the reason.
    det = compared[("30 vs 150 images per class", "voc07_det_map")]
    assert det["images_low"] == "" and det["images_verdict"] == "no interval"
    assert "per_image/voc07_det_detections.parquet is missing" in det["why_no_interval"]
    # 12 per class has no per-image scores at all and one seed, and no detection mAP.
    twelve = compared[("12 vs 150 images per class", "sun397_acc")]
    assert "no per-image scores" in twelve["why_no_interval"]
    assert "2 of 6 trial runs of this experiment have no per_image/ artifacts" in text
    assert "fewer than two seeds" in twelve["why_no_interval"]
    assert compared[("12 vs 150 images per class", "voc07_det_map")]["difference"] == ""
    assert "missing on a side" in compared[("12 vs 150 images per class", "voc07_det_map")]["why_no_interval"]

    assert page == tmp_path / "out" / "report.html"
    html = page.read_text()
    assert "data:image/png;base64," in html and "src='http" not in html and "<link" not in html
    assert (tmp_path / "out" / "images_per_class.png").stat().st_size > 10_000


def test_the_report_is_logged_on_the_parent_run(known_store, tmp_path):
    from itl_ray.report import report

    report("study", tmp_path / "out", resamples=50, log=lambda line: None)
    store = Reader(known_store)
    parent = store.latest_sweep("study").info.run_id
    logged = {item.path for item in store.client.list_artifacts(parent, "report")}
    assert {"report/report.html", "report/images_per_class.md", "report/images_per_class.csv",
            "report/images_per_class.png", "report/trials.csv"} <= logged


def test_identical_sides_have_an_interval_of_zero(tmp_path, monkeypatch):
    right = np.random.default_rng(1).random(120) < 0.6
    trials = [{"experiments": ["pascal_removed"], "point": name, "label_set": name, "per_class": 60, "seed": seed,
               "metrics": metrics(5.0, 20.0, 33.0), "right": right}
              for name in ("fine", "pascal_removed") for seed in (0, 1)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", make_store(tmp_path, trials))
    from itl_ray.report import report

    report(None, tmp_path / "out", resamples=100, log=lambda line: None, log_to_mlflow=False)
    with open(tmp_path / "out" / "pascal_removed_comparisons.csv") as handle:
        sun = [row for row in csv.DictReader(handle) if row["metric"] == "sun397_acc"][0]
    assert sun["comparison"] == "pascal_removed vs fine"
    assert (float(sun["images_low"]), float(sun["images_high"])) == (0.0, 0.0)
    assert sun["images_verdict"] == "no significant difference"


def run_report(tmp_path, *args, uri: str | None = None, timeout: float = 120):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([sys.executable, "-m", "itl_ray.cli", "report", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_an_unknown_experiment_lists_those_there_are_and_creates_nothing(known_store, tmp_path):
    done = run_report(tmp_path, "--experiment", "nope", uri=known_store)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "no experiment 'nope'" in done.stderr
    assert "experiments with sweeps: study" in done.stderr
    names = [e.name for e in Reader(known_store).client.search_experiments()]
    assert "nope" not in names


def test_a_store_that_is_not_there_is_named(tmp_path):
    done = run_report(tmp_path)  # no MLFLOW_TRACKING_URI and no itl_runs/mlflow.db here
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "itl_runs/mlflow.db" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "itl_runs").exists()  # reading created nothing
    for folder in ("notauri", f"file://{tmp_path}"):
        done = run_report(tmp_path, uri=folder)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert f"MLFLOW_TRACKING_URI={folder} names a folder" in done.stderr and "sqlite:///" in done.stderr
    missing = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    done = run_report(tmp_path, uri=missing)
    assert done.returncode == 2 and missing in done.stderr
    assert not (tmp_path / "elsewhere.db").exists()


def test_a_file_that_is_not_a_store_is_named(tmp_path):
    (tmp_path / "junk.db").write_text("not a database")
    uri = f"sqlite:///{tmp_path / 'junk.db'}"
    done = run_report(tmp_path, uri=uri)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"cannot open MLflow store {uri}" in done.stderr


def test_a_server_that_does_not_answer_fails_fast(tmp_path):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    done = run_report(tmp_path, uri=f"http://127.0.0.1:{port}")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert f"http://127.0.0.1:{port}" in done.stderr and "not reachable" in done.stderr
    assert time.monotonic() - started < 60  # MLflow's own retries would take minutes


def test_a_store_without_sweeps_says_so(tmp_path):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    Tracker("something", uri)
    done = run_report(tmp_path, uri=uri)
    assert done.returncode == 2 and "holds no sweep" in done.stderr and "itl-ray sweep" in done.stderr


def test_unreadable_per_image_scores_leave_the_interval_out_with_the_reason(tmp_path, monkeypatch):
    right = np.ones(120, bool)
    trials = [{"experiments": ["pascal_removed"], "point": name, "label_set": name, "per_class": 60, "seed": 0,
               "metrics": metrics(5.0, 20.0, 33.0), "right": right} for name in ("fine", "pascal_removed")]
    uri = make_store(tmp_path, trials)
    store = Reader(uri)
    broken = [run for run in store.client.search_runs([store.client.get_experiment_by_name("study").experiment_id])
              if run.data.tags.get(POINT) == "pascal_removed"][0]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "sun397_predictions.parquet").write_text("garbage")
    store.client.log_artifacts(broken.info.run_id, str(tmp_path / "bad"), "per_image")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from itl_ray.report import report

    report("study", tmp_path / "out", resamples=50, log=lambda line: None, log_to_mlflow=False)
    with open(tmp_path / "out" / "pascal_removed_comparisons.csv") as handle:
        sun = [row for row in csv.DictReader(handle) if row["metric"] == "sun397_acc"][0]
    assert sun["images_low"] == "" and "not a readable Parquet file" in sun["why_no_interval"]


def test_analysis_script_runs_the_same_report(known_store, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "analysis" / "report.py"), "--experiment", "study", "--out",
                           str(tmp_path / "script"), "--resamples", "20", "--no-log"],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "script" / "report.html").is_file()
    assert "images_per_class" in done.stdout and "report.html" in done.stdout
