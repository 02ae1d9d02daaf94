"""A real 2-trial sweep through Ray Tune into a sqlite MLflow store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import tiny_spec
from tests.mlflow_server import mlflow_server, rest
from tests.processes import ray_tmpdir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.filterwarnings("ignore")


def test_resume_without_an_earlier_sweep_says_so(tmp_path, mini_paths):
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'runs'}")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'Y.db'}"}
    done = subprocess.run([sys.executable, "-m", "itl_ray.cli", "sweep", str(spec), "--resume"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "--resume: no earlier sweep 'tiny'" in done.stderr


def assert_console_is_clean(output: str) -> None:
    """What a user reads while a sweep runs: the sweep's progress and each trial's own lines, no
    Ray noise (tracebacks, checkpoint notices, TensorBoard hints, colour codes when piped, folded
    lines)."""
    assert "Traceback" not in output
    assert "Checkpoint successfully created" not in output
    assert "\x1b[" not in output  # piped: no ANSI colour codes
    assert "tensorboard" not in output.lower() and "repeated" not in output
    assert "sweep tiny: 0/2 trials done, 1 running, 1 pending" in output
    assert "sweep tiny: 2/2 trials done, 0 running, 0 pending" in output
    assert re.search(r"sweep tiny: 1/2 trials done, 1 running, 0 pending; \S+ elapsed, ~\S+ left", output)
    for iteration in (2, 4):  # every checkpoint line of the trial (one per epoch here), none folded into another
        assert f"[num_classes=4,images_per_class=8] pretrain: iteration {iteration}/4 (epoch {iteration // 2}.0)" in output


def test_sweep_runs_two_trials_into_mlflow(tmp_path, mini_paths):
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'runs'}")
    db = tmp_path / "X.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    # One trial at a time, so that the first trial ends well before the sweep does.
    done = subprocess.run([sys.executable, "-m", "itl_ray.cli", "sweep", str(spec), "--set", "max_concurrent_trials=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for metric in ("pretrain_top1", "voc07_det_map", "voc12_act_map", "sun397_acc"):
        assert metric in done.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in done.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("itl.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("itl.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    assert parents[0].data.tags["mlflow.note.content"] == "A tiny sweep for the tests."  # the spec's header comment
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == "FINISHED"
        for param in ("experiment", "num_classes", "images_per_class", "label_set", "seed", "subset_hash",
                      "pretrain_images"):
            assert param in child.data.params
        # The metrics in MLflow are the ones the trial computed (its results in its latest
        # checkpoint), rounded to hundredths of a percent.
        checkpoint = Path(child.data.tags["itl.checkpoint"])
        stages = json.loads((checkpoint / "stages.json").read_text())
        assert set(stages) == {"pretrain", "detection", "action", "scene"}
        computed = {key: value for stage in stages.values() for key, value in stage.items()}
        for metric in ("pretrain_top1", "voc07_det_map", "voc12_act_map", "sun397_acc"):
            assert 0.0 <= child.data.metrics[metric] <= 100.0
            assert child.data.metrics[metric] == round(computed[metric], 2)
        # Ray's storage keeps what --resume needs: the trial's latest checkpoint, in a folder
        # named after the trial; no pretraining checkpoint once pretraining is done, no result loggers.
        trial_id = child.data.tags["itl.trial_id"]
        assert checkpoint.parent.name == f"{child.info.run_name}-{trial_id}"
        assert (checkpoint / "backbone.pt").is_file() and not (checkpoint / "pretrain.pt").exists()
    storage = tmp_path / "runs"
    for unwanted in ("result.json", "progress.csv", "events.out.tfevents*"):
        assert not list(storage.rglob(unwanted)), unwanted
    control = [c for c in children if c.data.params["images_per_class"] == "0"]
    assert len(control) == 1 and control[0].data.params["subset_hash"] == "none"
    pretrained = [c for c in children if c.data.params["images_per_class"] == "8"][0]
    # Curves, step = iteration: the tiny spec's trial takes 2 epochs of 2 iterations (loss at each,
    # validation at each epoch's end).
    history = client.get_metric_history(pretrained.info.run_id, "pretrain/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    history = client.get_metric_history(pretrained.info.run_id, "pretrain/val_top1")
    assert sorted(m.step for m in history) == [2, 4]

    # The store as the MLflow UI sees it, through a real server and its REST API.
    with mlflow_server(f"sqlite:///{db}", tmp_path / "server.log") as base:
        found = rest(base, "experiments/get-by-name", experiment_name="tiny")["experiment"]
        tags = {tag["key"]: tag["value"] for tag in found["tags"]}
        assert tags["mlflow.experimentKind"] == "custom_model_development"  # opens on its runs
        listed = rest(base, "runs/search", {"experiment_ids": [found["experiment_id"]], "max_results": 100})["runs"]
        trial_runs = sorted((run for run in listed
                             if {"key": "itl.role", "value": "trial"} in run["data"]["tags"]),
                            key=lambda run: int(run["info"]["start_time"]))
        (sweep_run,) = [run for run in listed if {"key": "itl.role", "value": "sweep"} in run["data"]["tags"]]
        assert [run["info"]["run_id"] for run in trial_runs] == [pretrained.info.run_id, control[0].info.run_id]
        for run in trial_runs:
            run_id = run["info"]["run_id"]
            keys = [param["key"] for param in run["data"]["params"]]
            assert len(keys) == len(set(keys))  # each param once ...
            for duplicate in ("pretrain.num_classes", "pretrain.images_per_class", "pretrain.label_set", "name",
                              "label_set_hash", "trial_id"):
                assert duplicate not in keys  # ... and each fact under one name
            # A run ends when its trial ends: its report log's last write, within seconds.
            checkpoint = Path(next(tag["value"] for tag in run["data"]["tags"] if tag["key"] == "itl.checkpoint"))
            trial_end = (checkpoint / "reports.jsonl").stat().st_mtime
            assert abs(int(run["info"]["end_time"]) / 1000 - trial_end) < 20, (run["info"], trial_end)
            for stage in ("pretrain", "detection", "action", "scene"):  # transfer curves, one series per stage
                answer = rest(base, "metrics/get-history", run_id=run_id, metric_key=f"{stage}/loss")
                history = answer.get("metrics", [])  # MLflow leaves the key out when there is none
                if stage == "pretrain" and run_id == control[0].info.run_id:
                    assert not history  # the control does not pretrain
                    continue
                assert history and all(point["step"] >= 1 for point in history), stage
            artifacts = {entry["path"] for entry in rest(base, "artifacts/list", run_id=run_id)["files"]}
            assert {"config.yaml", "label_set.tsv", "subset.tsv", "subset.json"} <= artifacts
        # Trials ran one after the other: the first one's run ended before the second started,
        # long before the sweep's closing replay.
        first, second = trial_runs
        assert int(first["info"]["end_time"]) <= int(second["info"]["start_time"])
        assert int(first["info"]["end_time"]) < int(sweep_run["info"]["end_time"])

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

    # What the user read while the first sweep ran.
    assert_console_is_clean(done.stdout + done.stderr)


def test_progress_line_counts_trials_and_estimates_the_time_left():
    from itl_ray.console import SweepProgress

    now, lines = [0.0], []
    progress = SweepProgress("demo", 4, lines.append, every=60, clock=lambda: now[0])
    progress.start("a")
    progress.start("b")
    assert lines[-1] == ("sweep demo: 0/4 trials done, 2 running, 2 pending; 0s elapsed, "
                         "time left known after the first trial")
    now[0] = 100.0
    progress.end("a")  # 100 s a trial; b needs about 0 s more, the 2 pending 100 s each, 2 at a time
    assert lines[-1] == "sweep demo: 1/4 trials done, 1 running, 2 pending; 1m40s elapsed, ~1m40s left"
    shown = len(lines)
    now[0] = 130.0
    progress.reported()  # within a minute of the last line: nothing
    assert len(lines) == shown
    now[0] = 161.0
    progress.reported()
    assert len(lines) == shown + 1
    progress.start("c")
    progress.end("b", failed=True)
    assert lines[-1] == "sweep demo: 1/4 trials done, 1 running, 1 pending, 1 failed; 2m41s elapsed, ~1m40s left"
    for trial in ("c", "d"):
        progress.start(trial)
        progress.end(trial)
    assert lines[-1] == "sweep demo: 3/4 trials done, 0 running, 0 pending, 1 failed; 2m41s elapsed"


def test_trial_folders_are_named_after_the_trial():
    from itl_ray.sweep import trial_folder_name

    assert trial_folder_name("num_classes=10,images_per_class=40", "3d41f04249ae") == (
        "num_classes=10,images_per_class=40-3d41f04249ae")
    assert trial_folder_name("label_set=up_down 127/x", "abc") == "label_set=up_down_127_x-abc"
    assert len(trial_folder_name("x" * 500, "abc")) == 104


# A SIGTERM whose handler runs inside a weakref callback, as when garbage collection is under way;
# then a callback that raises another error.
LOST_SIGTERM = """
import os, signal, sys, weakref
{setup}
class Held:
    pass

def on_collected(_):
    os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at once, inside the callback

def on_collected_wrongly(_):
    raise ValueError("a broken callback")

def lose_sigterm(install):
    if install:
        from itl_ray.console import quiet_lost_sigterm
        quiet_lost_sigterm()
    for callback in (on_collected, on_collected_wrongly):
        held = Held()
        ref = weakref.ref(held, callback)
        del held
    return "survived"
{run}
"""


@pytest.mark.parametrize("install", [False, True])
def test_a_sigterm_lost_in_a_weakref_callback_prints_no_traceback(install):
    # Ray's worker handler, as in ray/_private/worker.py: raise SystemExit(1).
    script = LOST_SIGTERM.format(
        setup="def handler(number, frame):\n    raise SystemExit(1)\nsignal.signal(signal.SIGTERM, handler)",
        run=f"print(lose_sigterm({install}))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert (done.returncode, done.stdout) == (0, "survived\n")  # Python ignores it, with or without the hook
    assert ("SystemExit" in done.stderr) is not install
    assert "ValueError: a broken callback" in done.stderr  # other errors are printed as before


def test_a_ray_worker_that_loses_a_sigterm_prints_no_traceback(tmp_path, ray_tmpdir):
    """With Ray's own SIGTERM handler, in an actor's process: the log of the worker whose hook is
    installed has no SystemExit traceback; that of one without the hook has it."""
    driver = LOST_SIGTERM.format(setup="", run="""
import json, ray
ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")

@ray.remote(num_cpus=0, max_restarts=0)
class Worker:
    def pid(self):
        return os.getpid()

    def lose_sigterm(self, install):
        return lose_sigterm(install)

outcome = {}
for install in (False, True):
    worker = Worker.remote()
    outcome[str(install)] = [ray.get(worker.pid.remote()), ray.get(worker.lose_sigterm.remote(install))]
    ray.kill(worker)
print(json.dumps(outcome))
ray.shutdown()
""")
    done = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])

    def log_of(pid: int) -> str:
        return "".join(path.read_text() for path in ray_tmpdir.glob(f"**/logs/worker-*-{pid}.err"))

    for install, (pid, result) in outcome.items():
        assert result == "survived"
        log = log_of(pid)
        assert "ValueError: a broken callback" in log  # the worker's log is where its errors go
        assert ("SystemExit" in log) is (install == "False"), log


def test_quiet_ray_keeps_what_the_user_set(monkeypatch):
    import io

    from itl_ray.console import quiet_ray

    for key in ("RAY_DEDUP_LOGS", "RAY_DISABLE_WORKER_LOG_PREFIX", "RAY_AIR_NEW_OUTPUT",
                "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "RAY_COLOR_PREFIX"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_DEDUP_LOGS", "1")
    quiet_ray(io.StringIO())  # not a terminal
    assert os.environ["RAY_DEDUP_LOGS"] == "1"  # the user's choice stays
    assert os.environ["RAY_COLOR_PREFIX"] == "0" and os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"
    assert os.environ["RAY_DISABLE_WORKER_LOG_PREFIX"] == "1" and os.environ["RAY_AIR_NEW_OUTPUT"] == "0"
