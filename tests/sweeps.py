"""Helpers of the tests that run real sweeps (`itl-ray sweep` in a subprocess) on the tiny spec and
inject faults at named points (``itl_ray.barrier``): the driver and its output, the trials' ids,
and what MLflow holds afterwards."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from itl_ray import barrier
from itl_ray.config import load_spec, parse_overrides, trial_id

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

    def wait_for(self, condition, what: str, timeout: float = 600.0):
        """Waits until ``condition()`` is truthy (and returns it), failing if the driver ends first.
        The timeout only ends a test whose sweep hangs; the order of events comes from barriers."""
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

    def finish(self, timeout: float = 900.0) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=30)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=60)


def trial_ids(spec: Path, overrides: list[str]) -> dict[str, str]:
    """Trial name (PRETRAINED, CONTROL) -> trial id, as the sweep computes them."""
    ids = {}
    for config in load_spec(spec, parse_overrides(overrides)).trials():
        name = PRETRAINED if config.pretrain.images_per_class else CONTROL
        ids[name] = trial_id(config)
    return ids


def wait_reached(driver: Driver, folder: Path, name: str) -> int:
    """The pid of the process held at barrier point ``name``, once it is there."""
    return driver.wait_for(lambda: barrier.reached(folder, name), f"barrier point {name}")


def trial_lines(driver: Driver, trial: str, pattern: str) -> list[re.Match]:
    """Matches of ``pattern`` in the log lines of one trial (lines start ``[<trial name>] ``)."""
    marker = f"[{trial}] "
    return [match for line in list(driver.lines) if marker in line
            for match in [re.search(pattern, line.split(marker, 1)[1])] if match]


def runs_by_name(db: Path) -> dict[str, object]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=100) if experiment else []
    return {run.info.run_name: run for run in runs}


def assert_complete(db: Path, epochs: int) -> dict:
    """One parent and two trial runs, all finished, the headline metrics in, every epoch once."""
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
    # The tiny spec's pretrained trial takes 2 iterations per epoch: a loss point each iteration and a
    # validation point at each epoch's end (its checkpoints).
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
