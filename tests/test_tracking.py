"""Tracking against a real sqlite MLflow store: one run per trial id, found again; idempotent metric
steps; checkpoints named on trial runs; and the read-only side that never writes."""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from pathlib import Path

import pytest

from itl_ray import tracking
from itl_ray.errors import UserError
from itl_ray.tracking import Reader, Tracker

pytestmark = pytest.mark.filterwarnings("ignore")  # MLflow's deprecation notes about its own internals


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One sqlite store for the module (creating one costs seconds); each test uses its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'store.db'}"


def test_one_run_per_trial_id_found_again(uri):
    tracker = Tracker("one_run", uri)
    parent = tracker.sweep_run("sweep-a", "one_run", resume=False)
    first = tracker.trial_run("trial-1", "num_classes=10", parent)
    assert tracker.trial_run("trial-1", "num_classes=10", parent) == first
    tracker.finish(first, failed=True)
    # A new driver process (a fresh Tracker) finds the same run and reopens it.
    again = Tracker("one_run", uri)
    assert again.experiment_id == tracker.experiment_id
    assert again.trial_run("trial-1", "num_classes=10", parent) == first
    assert again.client.get_run(first).info.status == "RUNNING"
    other = again.trial_run("trial-2", "num_classes=40", parent)
    assert other != first
    run = again.client.get_run(first)
    assert run.data.tags[tracking.ROLE] == tracking.ROLE_TRIAL and run.data.tags[tracking.PARENT] == parent
    assert run.data.tags[tracking.TRIAL_ID] == "trial-1"
    assert {r.info.run_id for r in again.trial_runs(parent)} == {first, other}
    # Under another sweep run the same trial id is another run.
    parent_b = again.sweep_run("sweep-b", "one_run", resume=False)
    assert again.trial_run("trial-1", "num_classes=10", parent_b) not in (first, other)


def test_resume_finds_the_latest_run_of_the_same_sweep(uri):
    tracker = Tracker("resume", uri)
    with pytest.raises(UserError, match=r"--resume: no earlier sweep 'resume' with this spec"):
        tracker.sweep_run("sweep-x", "resume", resume=True)
    older = tracker.sweep_run("sweep-x", "resume", resume=False)
    tracker.finish(older)
    newer = tracker.sweep_run("sweep-x", "resume", resume=False)
    tracker.finish(newer)
    tracker.sweep_run("sweep-y", "resume", resume=False)  # another spec: never resumed by sweep-x
    assert newer != older
    assert tracker.sweep_run("sweep-x", "resume", resume=True) == newer
    assert tracker.client.get_run(newer).info.status == "RUNNING"


def test_metric_steps_are_logged_once(uri):
    tracker = Tracker("metrics", uri)
    run = tracker.trial_run("t", "t", None)
    tracker.log_metrics(run, {"pretrain/loss": 2.5, "pretrain/lr": 0.01}, step=1)
    tracker.log_metrics(run, {"pretrain/loss": 9.9}, step=1)  # a repeated report after a retry
    tracker.log_metrics(run, {"pretrain/loss": 1.5, "flag": True, "bad": math.nan, "name": "x"}, step=2)
    tracker.record(run, "final", {"voc07_det_map": 12.5}, None)
    tracker.record(run, "final", {"voc07_det_map": 99.0}, None)
    # A fresh tracker (the driver restarted) reads what the run holds before logging.
    Tracker("metrics", uri).log_metrics(run, {"pretrain/loss": 7.0, "pretrain/lr": 0.02}, step=1)
    client = tracker.client
    assert [(m.step, m.value) for m in client.get_metric_history(run, "pretrain/loss")] == [(1, 2.5), (2, 1.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run, "pretrain/lr")] == [(1, 0.01)]
    assert [(m.step, m.value) for m in client.get_metric_history(run, "voc07_det_map")] == [(0, 12.5)]
    assert set(client.get_run(run).data.metrics) == {"pretrain/loss", "pretrain/lr", "voc07_det_map"}


def test_params_are_logged_once_and_never_changed(uri):
    tracker = Tracker("params", uri)
    run = tracker.trial_run("t", "t", None)
    tracker.record(run, "params", {"num_classes": 40, "label_set": "fine", "seed": 0}, None)
    tracker.log_params(run, {"num_classes": 10, "subset_hash": "abc"})  # MLflow refuses to change a param
    assert tracker.client.get_run(run).data.params == {"num_classes": "40", "label_set": "fine", "seed": "0",
                                                       "subset_hash": "abc"}


def test_checkpoints_are_named_on_trial_runs(uri):
    tracker = Tracker("checkpoints", uri)
    parent = tracker.sweep_run("s", "checkpoints", resume=False)
    first = tracker.trial_run("trial-1", "a", parent)
    tracker.trial_run("trial-2", "b", parent)  # no checkpoint yet
    tracker.set_checkpoint(first, "/runs/trial-1/checkpoint_000001")
    tracker.set_checkpoint(first, "s3://bucket/runs/trial-1/checkpoint_000002")  # the latest replaces it
    assert tracker.trial_checkpoints(parent) == {"trial-1": "s3://bucket/runs/trial-1/checkpoint_000002"}
    other = tracker.sweep_run("s2", "checkpoints", resume=False)
    assert tracker.trial_checkpoints(other) == {}


def test_reader_reads_what_the_tracker_wrote(uri, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker("reader", uri)
    parent = tracker.sweep_run("s", "reader", resume=False)
    runs = {}
    for trial_id, images in (("a", 40), ("b", 0)):
        runs[trial_id] = tracker.trial_run(trial_id, f"images_per_class={images}", parent)
        tracker.log_params(runs[trial_id], {"images_per_class": images})
        tracker.log_metrics(runs[trial_id], {"voc07_det_map": 10.0 + images})
    folder = tmp_path / "per_image"
    folder.mkdir()
    (folder / "sun397_predictions.parquet").write_bytes(b"PAR1 rows")
    tracker.log_artifacts(runs["a"], folder, "per_image")
    with pytest.raises(FileNotFoundError):
        tracker.log_artifacts(runs["a"], tmp_path / "missing", "per_image")

    reader = Reader(uri)
    assert "reader" in reader.experiment_names()
    sweep = reader.latest_sweep("reader")
    assert sweep.info.run_id == parent and reader.experiment_of(sweep) == "reader"
    assert [run.info.run_id for run in reader.trial_runs(parent)] == [runs["a"], runs["b"]]
    frame = reader.runs_frame("reader", sweep_run_id=parent)
    assert list(frame["run_id"]) == [runs["a"], runs["b"]]
    assert list(frame["params.images_per_class"]) == ["40", "0"]
    assert list(frame["metrics.voc07_det_map"]) == [50.0, 10.0]
    assert set(frame["tags.itl.role"]) == {"trial"}
    assert list(reader.runs_frame("reader", role=tracking.ROLE_SWEEP)["run_id"]) == [parent]
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the process-wide URI is left as it was
    local = reader.download(runs["a"], "per_image", tmp_path / "down")
    assert (local / "sun397_predictions.parquet").read_bytes() == b"PAR1 rows"
    with pytest.raises(UserError, match=rf"run {runs['b']} has no artifact 'per_image'"):
        reader.download(runs["b"], "per_image", tmp_path / "down")


def test_reading_never_writes(uri, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(UserError, match=r"MLflow store sqlite:///.*nowhere/mlflow.db does not exist"):
        Reader(f"sqlite:///{missing}")
    assert not missing.parent.exists()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(create=False) == f"sqlite:///{tmp_path / 'itl_runs' / 'mlflow.db'}"
    with pytest.raises(UserError, match=r"MLflow store sqlite:///.*itl_runs/mlflow.db does not exist .*run the report where the sweep ran"):
        Reader()
    assert not (tmp_path / "itl_runs").exists()

    reader = Reader(uri)
    before = {e.name for e in reader.client.search_experiments()}
    with pytest.raises(UserError, match=r"no experiment 'nope' in sqlite:.*; experiments with sweeps: .*checkpoints"):
        reader.latest_sweep("nope")
    Tracker("empty_experiment", uri)
    with pytest.raises(UserError, match=r"experiment 'empty_experiment' in sqlite:.* holds no sweep"):
        reader.latest_sweep("empty_experiment")
    after = {e.name for e in reader.client.search_experiments()}
    assert after == before | {"empty_experiment"}  # only the Tracker created one


def test_experiment_opens_on_its_trial_runs(uri):
    tracker = Tracker("ui_view", uri)
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.trials"])
    assert view["searchFilter"] == "tags.`itl.role` = 'trial'"
    assert "metrics.`pretrain_top1`" in view["selectedColumns"] and "params.`num_classes`" in view["selectedColumns"]
    store = uri[len("sqlite:///"):]
    assert experiment.artifact_location == (Path(store).parent / "artifacts" / "ui_view").as_uri()
    # An experiment made before these conventions gets the tags it lacks.
    from mlflow.tracking import MlflowClient

    old = MlflowClient(tracking_uri=uri).create_experiment("made_elsewhere")
    Tracker("made_elsewhere", uri)
    assert tracker.client.get_experiment(old).tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    parent = tracker.sweep_run("s", "ui_view", resume=False)
    tracker.describe(parent, "The study in miniature.")
    assert tracker.client.get_run(parent).data.tags["mlflow.note.content"] == "The study in miniature."
    assert tracker.client.get_experiment(tracker.experiment_id).tags["mlflow.note.content"] == "The study in miniature."


def test_a_second_finish_keeps_the_end_time(uri):
    tracker = Tracker("durations", uri)
    run = tracker.trial_run("t", "t", None)
    tracker.finish(run)
    ended = tracker.client.get_run(run).info.end_time
    time.sleep(0.05)  # so that a moved end time would differ, not to wait for anything
    tracker.finish(run)  # the sweep's closing replay
    assert tracker.client.get_run(run).info.end_time == ended
    tracker.finish(run, failed=True)  # a status can still change, its time not
    info = tracker.client.get_run(run).info
    assert (info.status, info.end_time) == ("FAILED", ended)
    # A finished trial's run is found again as it is (a resumed sweep passing over the trial);
    # one that failed is reopened and ends anew.
    done = tracker.trial_run("u", "u", None)
    tracker.finish(done)
    assert tracker.trial_run("u", "u", None) == done and tracker.client.get_run(done).info.status == "FINISHED"
    assert tracker.trial_run("t", "t", None) == run and tracker.client.get_run(run).info.status == "RUNNING"
    time.sleep(0.05)
    tracker.finish(run)
    assert tracker.client.get_run(run).info.end_time > ended


def test_values_are_rounded_to_what_they_mean(uri):
    tracker = Tracker("rounding", uri)
    run = tracker.trial_run("t", "t", None)
    tracker.log_metrics(run, {"voc07_det_map": 12.345678, "voc07_det_ap/cat": 3.14159, "seconds/detection": 61.2345,
                              "sun397_acc/partition_01": 40.0049})
    tracker.log_metrics(run, {"detection/lr": 0.000123456, "detection/loss": 1.234567}, step=3)
    metrics = tracker.client.get_run(run).data.metrics
    assert metrics == {"voc07_det_map": 12.35, "voc07_det_ap/cat": 3.14, "seconds/detection": 61.2,
                       "sun397_acc/partition_01": 40.0, "detection/lr": 0.0001235, "detection/loss": 1.235}


def test_params_once_and_identity_hashes_as_tags(uri):
    tracker = Tracker("layout", uri)
    run = tracker.trial_run("abc", "t", None)
    tracker.record(run, "params", {"num_classes": 10, "trial_id": "abc", "label_set_hash": "0123", "seed": 0}, None)
    data = tracker.client.get_run(run).data
    assert data.params == {"num_classes": "10", "seed": "0"}
    assert data.tags[tracking.TRIAL_ID] == "abc" and data.tags[tracking.LABEL_SET_HASH] == "0123"


def test_trial_files_are_logged_as_artifacts(uri, tmp_path):
    tracker = Tracker("files", uri)
    run = tracker.trial_run("t", "t", None)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "label_set.tsv").write_text("wnid\tgroup_wnid\n")
    (tmp_path / "per_image").mkdir()
    (tmp_path / "per_image" / "sun397_predictions.parquet").write_bytes(b"PAR1")
    (tmp_path / "backbone.pt").write_bytes(b"weights")  # not part of the record
    tracker.log_trial_files(run, tmp_path, ("config.yaml", "label_set.tsv", "subset.tsv"), ("per_image",))
    listed = {entry.path for entry in tracker.client.list_artifacts(run)}
    assert listed == {"config.yaml", "label_set.tsv", "per_image"}
    assert [entry.path for entry in tracker.client.list_artifacts(run, "per_image")] == [
        "per_image/sun397_predictions.parquet"]


def test_ui_hint_names_this_environments_mlflow_quoted(tmp_path, monkeypatch):
    store = tmp_path / "a folder" / "mlflow.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    experiment_id = Tracker("hint", uri).experiment_id
    hint = tracking.ui_hint("hint", uri)
    command, address = hint.split("\n")
    assert shlex.split(command)[1:] == ["ui", "--backend-store-uri", uri]  # the space survives the shell
    assert shlex.split(command)[0].endswith("mlflow")
    assert address.strip() == (f"then open http://127.0.0.1:5000/#/experiments/{experiment_id}/runs"
                               "?workflowType=machine_learning&viewStateShareKey=trials")
    # A tracking server is its own UI; one that does not answer still gets its address.
    assert tracking.ui_hint("hint", "http://127.0.0.1:9/") == "open http://127.0.0.1:9/"
