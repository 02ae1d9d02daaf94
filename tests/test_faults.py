"""Sweeps that survive faults: a worker node lost during a trial, and a driver killed mid-sweep.

Both run real sweeps (`itl-ray sweep` in a subprocess) on the tiny spec and check what a user
relies on: every trial finishes, MLflow holds one run per trial with no metric step missing or
doubled, and work finished before the fault is not done again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import processes
from tests.processes import ray_tmpdir  # noqa: F401 (a fixture)
from tests.conftest import tiny_spec

pytestmark = pytest.mark.filterwarnings("ignore")

PRETRAINED, CONTROL = "num_classes=4,images_per_class=8", "num_classes=4,images_per_class=0"
TRANSFERS = ("detection", "action", "scene")


class Driver:
    """`itl-ray sweep` in a subprocess; its output lines are collected as they come."""

    def __init__(self, args: list[str], env: dict, cwd: Path):
        self.lines: list[str] = []
        self.process = subprocess.Popen([sys.executable, "-m", "itl_ray.cli", "sweep", *args], cwd=cwd, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, condition, what: str, timeout: float = 300.0):
        """Waits until ``condition()`` is truthy (and returns it), failing if the driver ends first."""
        deadline = time.time() + timeout
        while True:
            value = condition()
            if value:
                return value
            if self.process.poll() is not None:
                raise AssertionError(f"the sweep ended before {what}:\n{self.output[-4000:]}")
            if time.time() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.output[-4000:]}")
            time.sleep(0.2)

    def finish(self, timeout: float = 600.0) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=30)
        return code


def trial_lines(driver: Driver, trial: str, pattern: str) -> list[re.Match]:
    """Matches of ``pattern`` in the log lines of one trial (lines start ``[<trial name>] ``)."""
    marker = f"[{trial}] "
    return [match for line in driver.lines if marker in line
            for match in [re.search(pattern, line.split(marker, 1)[1])] if match]


def runs_by_name(db: Path) -> dict[str, object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=100) if experiment else []
    return {run.info.run_name: run for run in runs}


def assert_complete(db: Path, epochs: int) -> dict:
    """One parent and two trial runs, all finished, the headline metrics in, every curve point once:
    the tiny spec's pretrained trial takes 2 iterations per epoch, a loss point each iteration and a
    validation point at each epoch's end (its checkpoints)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = runs_by_name(db)
    roles = sorted(run.data.tags.get("itl.role") for run in runs.values())
    assert roles == ["sweep", "trial", "trial"], roles
    assert set(runs) == {"tiny", PRETRAINED, CONTROL}
    for run in runs.values():
        assert run.info.status == "FINISHED", (run.info.run_name, run.info.status)
    for name in (PRETRAINED, CONTROL):
        for metric in ("pretrain_top1", "voc07_det_map", "voc12_act_map", "sun397_acc"):
            assert 0.0 <= runs[name].data.metrics[metric] <= 100.0
    for metric, expected in (("pretrain/loss", range(1, 2 * epochs + 1)), ("pretrain/val_top1", range(2, 2 * epochs + 1, 2))):
        steps = sorted(m.step for m in client.get_metric_history(runs[PRETRAINED].info.run_id, metric))
        assert steps == list(expected), (metric, steps)
        assert not client.get_metric_history(runs[CONTROL].info.run_id, metric)
    for metric in ("voc07_det_map", "sun397_acc"):  # final metrics: one value each, not one per attempt
        assert len(client.get_metric_history(runs[PRETRAINED].info.run_id, metric)) == 1
    return runs


def checkpoint_stages(run) -> dict:
    """stages.json of the checkpoint a trial's MLflow run names (the storage is a local folder);
    empty while there is none (or Tune has just replaced it)."""
    if "itl.checkpoint" not in run.data.tags:
        return {}
    try:
        return json.loads((Path(run.data.tags["itl.checkpoint"]) / "stages.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def test_a_lost_worker_node_costs_only_the_epoch_in_flight(tmp_path, mini_paths, ray_tmpdir):
    """A head without CPUs and two worker nodes with one (declared) GPU each: the two trials run
    side by side, one per node. The node of the pretraining trial is removed mid-pretraining; Tune
    retries the trial on the other node, where it resumes from its last epoch checkpoint."""
    from ray.cluster_utils import Cluster

    epochs = 40
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                           "health_check_failure_threshold": 3}})
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'storage'}\nmax_failures: 2")
        db = tmp_path / "mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "RAY_ADDRESS": cluster.address}
        driver = Driver([str(spec), "--set", f"pretrain.epochs={epochs}", "--set", "resources.gpus_per_trial=1"],
                        env, tmp_path)
        try:
            nodes = driver.wait_for(lambda: len(trial_lines(driver, PRETRAINED, r"on node (\w+)")) == 1 and
                                    len(trial_lines(driver, CONTROL, r"on node (\w+)")) == 1 and
                                    trial_lines(driver, PRETRAINED, r"pretrain: iteration \d+/\d+ \(epoch 3\.0\)"),
                                    "pretraining epoch 3")
            first = trial_lines(driver, PRETRAINED, r"on node (\w+)")[0].group(1)
            other = trial_lines(driver, CONTROL, r"on node (\w+)")[0].group(1)
            assert nodes and first != other  # one trial per GPU node
            lost = next(node for node in workers if node.node_id == first)
            cluster.remove_node(lost, allow_graceful=False)
            assert driver.finish() == 0, driver.output[-4000:]
        finally:
            if driver.process.poll() is None:
                driver.process.kill()
        output = driver.output
        restarts = trial_lines(driver, PRETRAINED, r"on node (\w+), starting from checkpoint")
        assert len(restarts) == 1 and restarts[0].group(1) == other, output[-4000:]
        resumed = trial_lines(driver, PRETRAINED, r"pretrain: resumed after iteration (\d+)")
        assert len(resumed) == 1 and int(resumed[0].group(1)) >= 1
        print(f"node {first[:8]} removed; the trial resumed on node {other[:8]} after epoch {resumed[0].group(1)}")
        assert not trial_lines(driver, CONTROL, r"starting from checkpoint")  # the other trial was untouched
        runs = assert_complete(db, epochs)
        assert set(checkpoint_stages(runs[PRETRAINED])) == {"pretrain", *TRANSFERS}
    finally:
        cluster.shutdown()


def test_a_killed_driver_resumes_without_redoing_or_doubling(tmp_path, mini_paths, ray_tmpdir):
    """The driver is SIGKILLed once the control trial has finished and the pretraining trial has
    checkpointed its first transfer stage; `--resume` finishes the sweep: the finished trial runs no
    stage again, the other continues from its checkpoint without redoing its finished stages, and
    MLflow ends with one run per trial and every metric."""
    epochs = 20
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'storage'}")
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    args = [str(spec), "--set", f"pretrain.epochs={epochs}"]

    def control_done_and_pretrained_in_transfers() -> bool:
        runs = runs_by_name(db)
        return (CONTROL in runs and runs[CONTROL].info.status == "FINISHED" and PRETRAINED in runs
                and "detection" in checkpoint_stages(runs[PRETRAINED]))

    driver = Driver(args, env, tmp_path)
    try:
        driver.wait_for(control_done_and_pretrained_in_transfers, "the control to finish and a transfer stage")
        driver.process.send_signal(signal.SIGKILL)
        driver.finish(timeout=60)
    finally:
        if driver.process.poll() is None:
            driver.process.kill()
    before = runs_by_name(db)
    assert before[PRETRAINED].info.status == "RUNNING"  # killed mid-sweep, not after it
    # The Ray instance the driver started goes with it (its GCS and raylet share the driver's fate;
    # helper processes that linger are stopped when the test ends).
    deadline = time.time() + 60
    while time.time() < deadline and processes.marked(str(ray_tmpdir), ("gcs_server", "raylet")):
        time.sleep(0.5)
    assert not processes.marked(str(ray_tmpdir), ("gcs_server", "raylet")), "the killed driver's Ray outlived it"
    control_stages, pretrained_stages = checkpoint_stages(before[CONTROL]), checkpoint_stages(before[PRETRAINED])
    print(f"driver killed; the pretraining trial had finished {sorted(pretrained_stages)}")
    assert set(control_stages) == {"pretrain", *TRANSFERS}
    assert {"pretrain", "detection"} <= set(pretrained_stages) < {"pretrain", *TRANSFERS}

    again = Driver([*args, "--resume"], env, tmp_path)
    assert again.finish() == 0, again.output[-4000:]
    runs = assert_complete(db, epochs)
    assert {run.info.run_id for run in runs.values()} == {run.info.run_id for run in before.values()}
    # The finished trial: every stage skipped, its results as they were.
    for stage in ("pretrain", *TRANSFERS):
        assert trial_lines(again, CONTROL, rf"^{stage}: done earlier"), again.output[-4000:]
    assert checkpoint_stages(runs[CONTROL]) == control_stages
    for metric, value in before[CONTROL].data.metrics.items():
        assert runs[CONTROL].data.metrics[metric] == value
    # The unfinished trial: continued from its checkpoint; its finished stages skipped and kept.
    assert trial_lines(again, PRETRAINED, r"starting from checkpoint")
    final_stages = checkpoint_stages(runs[PRETRAINED])
    assert set(final_stages) == {"pretrain", *TRANSFERS}
    for stage in ("pretrain", *TRANSFERS):
        skipped = bool(trial_lines(again, PRETRAINED, rf"^{stage}: done earlier"))
        assert skipped == (stage in pretrained_stages), (stage, again.output[-4000:])
        if skipped:
            assert final_stages[stage] == pretrained_stages[stage]
