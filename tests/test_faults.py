"""Sweeps that survive faults: a worker node lost during a trial, and a driver killed mid-sweep.

Both run real sweeps (`itl-ray sweep` in a subprocess) on the tiny spec and check what a user
relies on: every trial finishes, MLflow holds one run per trial with no metric step missing or
doubled, and work finished before the fault is not done again. The fault lands where the test
wants it: the trials wait at named points (``itl_ray.barrier``, armed through ``ITL_RAY_BARRIERS``)
until the fault is in place, so a fast or a loaded machine sees the same sequence of events.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from itl_ray import barrier
from tests import processes
from tests.conftest import tiny_spec
from tests.processes import ray_tmpdir  # noqa: F401 (a fixture)
from tests.sweeps import (CONTROL, PRETRAINED, TRANSFERS, Driver, assert_complete, checkpoint_stages, runs_by_name,
                          trial_ids, trial_lines, wait_reached)

pytestmark = pytest.mark.filterwarnings("ignore")


def test_a_lost_worker_node_costs_only_the_epoch_in_flight(tmp_path, mini_paths, ray_tmpdir, monkeypatch):
    """A head without CPUs and two worker nodes with one (declared) GPU each: the two trials run
    side by side, one per node. The pretraining trial is held after its epoch 2 (checkpointed),
    the control after its detection stage; the pretraining trial's node is removed. Its worker
    process must die with the node, Tune must retry the trial on the other node, and the retry
    must resume after epoch 2: only the epoch in flight is lost."""
    from ray.cluster_utils import Cluster

    epochs, held_epoch = 4, 2
    barriers = tmp_path / "barriers"
    barriers.mkdir()
    monkeypatch.setenv(barrier.ENVIRONMENT, str(barriers))  # the nodes started below inherit it
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'storage'}\nmax_failures: 2")
    overrides = [f"pretrain.epochs={epochs}", "resources.gpus_per_trial=1"]
    ids = trial_ids(spec, overrides)
    epoch_point, control_point = f"{ids[PRETRAINED]}.pretrain-epoch-{held_epoch}", f"{ids[CONTROL]}.detection-done"
    barrier.hold(barriers, epoch_point)
    barrier.hold(barriers, control_point)

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                           "health_check_failure_threshold": 3}})
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        db = tmp_path / "mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "RAY_ADDRESS": cluster.address}
        driver = Driver([str(spec), *(f"--set={item}" for item in overrides)], env, tmp_path)
        try:
            worker_pid = wait_reached(driver, barriers, epoch_point)
            wait_reached(driver, barriers, control_point)
            first = trial_lines(driver, PRETRAINED, r"on node (\w+)")[0].group(1)
            other = trial_lines(driver, CONTROL, r"on node (\w+)")[0].group(1)
            assert first != other  # one trial per GPU node
            lost = next(node for node in workers if node.node_id == first)
            cluster.remove_node(lost, allow_graceful=False)
            # The trial's worker goes with its node (it exits when it sees its raylet gone).
            deadline = time.time() + 120
            while processes.alive(worker_pid) and time.time() < deadline:
                time.sleep(0.2)
            assert not processes.alive(worker_pid), "the trial's worker process outlived its node"
            barrier.release(barriers, epoch_point)
            barrier.release(barriers, control_point)
            assert driver.finish() == 0, driver.output[-4000:]
        finally:
            driver.kill()
        output = driver.output
        restarts = trial_lines(driver, PRETRAINED, r"on node (\w+), starting from checkpoint")
        assert len(restarts) == 1 and restarts[0].group(1) == other, output[-4000:]
        resumed = trial_lines(driver, PRETRAINED, r"pretrain: resumed after iteration \d+ \(epoch (\d+)\.00\)")
        assert [int(match.group(1)) for match in resumed] == [held_epoch], output[-4000:]
        print(f"node {first[:8]} removed; the trial resumed on node {other[:8]} after epoch {held_epoch}")
        assert not trial_lines(driver, CONTROL, r"starting from checkpoint")  # the other trial was untouched
        runs = assert_complete(db, epochs)
        assert set(checkpoint_stages(runs[PRETRAINED])) == {"pretrain", *TRANSFERS}
    finally:
        cluster.shutdown()


def test_a_killed_driver_resumes_without_redoing_or_doubling(tmp_path, mini_paths, ray_tmpdir, monkeypatch):
    """The pretraining trial is held after its detection stage (checkpointed) while the control
    trial finishes; then the driver is SIGKILLed. `--resume` finishes the sweep: the finished trial
    runs no stage again, the other continues from its checkpoint without redoing detection, and
    MLflow ends with one run per trial and every metric."""
    epochs = 2
    barriers = tmp_path / "barriers"
    monkeypatch.setenv(barrier.ENVIRONMENT, str(barriers))
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'storage'}")
    args = [str(spec), "--set", f"pretrain.epochs={epochs}"]
    ids = trial_ids(spec, [f"pretrain.epochs={epochs}"])
    held = f"{ids[PRETRAINED]}.detection-done"
    barrier.hold(barriers, held)
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}

    def control_done_and_detection_recorded() -> bool:
        runs = runs_by_name(db)
        return (CONTROL in runs and runs[CONTROL].info.status == "FINISHED" and PRETRAINED in runs
                and "detection" in checkpoint_stages(runs[PRETRAINED]))

    driver = Driver(args, env, tmp_path)
    try:
        wait_reached(driver, barriers, held)
        # The pretraining trial waits; these happen while it does (no race with its progress).
        driver.wait_for(control_done_and_detection_recorded, "the control to finish and detection's checkpoint")
        driver.process.send_signal(signal.SIGKILL)
        driver.finish(timeout=60)
    finally:
        driver.kill()
    before = runs_by_name(db)
    assert before[PRETRAINED].info.status == "RUNNING"  # killed mid-sweep, not after it
    # The Ray instance the driver started goes with it (its GCS and raylet share the driver's fate;
    # helper processes that linger are stopped when the test ends).
    deadline = time.time() + 60
    while time.time() < deadline and processes.marked(str(ray_tmpdir), ("gcs_server", "raylet")):
        time.sleep(0.5)
    assert not processes.marked(str(ray_tmpdir), ("gcs_server", "raylet")), "the killed driver's Ray outlived it"
    control_stages, pretrained_stages = checkpoint_stages(before[CONTROL]), checkpoint_stages(before[PRETRAINED])
    assert set(control_stages) == {"pretrain", *TRANSFERS}
    assert set(pretrained_stages) == {"pretrain", "detection"}

    barrier.release(barriers, held)
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
