"""Stopping a sweep with Ctrl-C (SIGINT) or SIGTERM: within seconds, one line, exit 130 / 143, the
runs marked KILLED (interrupted, not failed), and `--resume` continues where it stopped.

The signal comes while both trials are held at named points (``itl_ray.barrier``): the
pretraining trial after epoch 1, the control after its detection stage."""

from __future__ import annotations

import os
import signal
import time

import pytest

from itl_ray import barrier
from tests.conftest import tiny_spec
from tests.processes import ray_tmpdir  # noqa: F401 (a fixture)
from tests.sweeps import CONTROL, PRETRAINED, Driver, assert_complete, runs_by_name, trial_ids, trial_lines, wait_reached

pytestmark = pytest.mark.filterwarnings("ignore")

EPOCHS = 2
STOP_SECONDS = 60  # "within seconds": a bound for a loaded machine, far below a trial's length


def interrupt_mid_sweep(tmp_path, mini_paths, monkeypatch, number: int):
    """Start the tiny sweep, hold both trials, send signal ``number`` to the driver; returns what
    the test needs to look at (the driver, its seconds to exit, the store, the points, args)."""
    barriers = tmp_path / "barriers"
    monkeypatch.setenv(barrier.ENVIRONMENT, str(barriers))
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths, extra=f"storage: {tmp_path / 'storage'}")
    args = [str(spec), "--set", f"pretrain.epochs={EPOCHS}"]
    ids = trial_ids(spec, [f"pretrain.epochs={EPOCHS}"])
    points = [f"{ids[PRETRAINED]}.pretrain-epoch-1", f"{ids[CONTROL]}.detection-done"]
    for point in points:
        barrier.hold(barriers, point)
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    driver = Driver(args, env, tmp_path)
    try:
        for point in points:
            wait_reached(driver, barriers, point)
        sent = time.time()
        driver.process.send_signal(number)
        code = driver.finish(timeout=300)
        seconds = time.time() - sent
    finally:
        driver.kill()
    return driver, code, seconds, db, barriers, points, args, env


def assert_stopped_cleanly(driver, code, seconds, db, name: str):
    """Exit 128 + signal within seconds; one line of ours, no traceback; the runs KILLED."""
    assert seconds < STOP_SECONDS, f"the sweep took {seconds:.0f} s to stop"
    print(f"{name}: stopped in {seconds:.1f} s with exit code {code}")
    ours = [line for line in driver.lines if line.startswith("interrupted by")]
    assert len(ours) == 1 and ours[0].startswith(f"interrupted by {name}: 2 running trial(s) stopped"), driver.output
    assert "--resume" in ours[0]
    assert "Traceback" not in driver.output and "failed" not in driver.output, driver.output[-4000:]
    assert driver.lines[-1] == ours[0]  # nothing after it (no results table, no error lines)
    runs = runs_by_name(db)
    assert {name: run.info.status for name, run in runs.items()} == {
        "tiny": "KILLED", PRETRAINED: "KILLED", CONTROL: "KILLED"}


def test_ctrl_c_stops_the_sweep_and_resume_continues(tmp_path, mini_paths, ray_tmpdir, monkeypatch):
    driver, code, seconds, db, barriers, points, args, env = interrupt_mid_sweep(
        tmp_path, mini_paths, monkeypatch, signal.SIGINT)
    assert code == 130, driver.output[-4000:]
    assert_stopped_cleanly(driver, code, seconds, db, "SIGINT")
    before = runs_by_name(db)

    for point in points:
        barrier.release(barriers, point)
    again = Driver([*args, "--resume"], env, tmp_path)
    assert again.finish() == 0, again.output[-4000:]
    runs = assert_complete(db, EPOCHS)
    assert {run.info.run_id for run in runs.values()} == {run.info.run_id for run in before.values()}
    assert trial_lines(again, PRETRAINED, r"pretrain: resumed after iteration \d+ \(epoch 1\.00\)")
    assert trial_lines(again, CONTROL, r"^detection: done earlier")


def test_sigterm_stops_the_sweep_as_ctrl_c_does(tmp_path, mini_paths, ray_tmpdir, monkeypatch):
    driver, code, seconds, db, *_ = interrupt_mid_sweep(tmp_path, mini_paths, monkeypatch, signal.SIGTERM)
    assert code == 143, driver.output[-4000:]
    assert_stopped_cleanly(driver, code, seconds, db, "SIGTERM")
