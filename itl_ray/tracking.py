"""MLflow conventions: the experiment, one parent run per sweep, one idempotent run per trial.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///itl_runs/mlflow.db`` under the
working directory. Experiment = the sweep's ``name``. The parent run has tag ``itl.role=sweep``;
each trial's run has ``itl.role=trial``, ``mlflow.parentRunId`` and ``itl.trial_id`` (a hash of
the trial's config). A trial's run is looked up by that id before one is created, so a retried or
resumed trial continues its run instead of starting a second one. A trial's run also names its
latest checkpoint (tag ``itl.checkpoint``: the trial's folder with ``backbone.pt`` and
``stages.json``), where ``--resume`` continues it from.

Recording is idempotent: a metric at a step the run already holds is not logged again, so a trial
that repeats a report after a retry, or a report log recorded twice, leaves one value per step.

All writes go through ``MlflowClient`` with explicit run ids (no global "active run"), from one
process: the sweep driver.
"""

from __future__ import annotations

import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from itl_ray.errors import UserError

DEFAULT_STORE = "itl_runs/mlflow.db"
ROLE = "itl.role"
TRIAL_ID = "itl.trial_id"
SWEEP_ID = "itl.sweep_id"
PARENT = "mlflow.parentRunId"
CHECKPOINT = "itl.checkpoint"


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path(DEFAULT_STORE).resolve()
    store.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when an MLflow server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status == 200:
                return
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise UserError(f"MLflow server {uri} is not reachable ({error}); start it or fix MLFLOW_TRACKING_URI") from None
    raise UserError(f"MLflow server {uri} did not answer its health check; start it or fix MLFLOW_TRACKING_URI")


class Tracker:
    """The MLflow side of a sweep or a trial."""

    def __init__(self, experiment: str, uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri()
        check_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self._logged: dict[str, set[tuple[str, int]]] = {}  # run id -> (metric, step) pairs it holds

    def _find(self, filter_string: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def sweep_run(self, sweep_id: str, name: str, resume: bool) -> str:
        """The parent run: the latest one of this sweep when resuming, else a new one."""
        if resume:
            found = self._find(f"tags.`{SWEEP_ID}` = '{sweep_id}' and tags.`{ROLE}` = 'sweep'")
            if found is None:
                raise UserError(f"--resume: no earlier sweep {name!r} with this spec in {self.uri}; run it without --resume")
            self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={ROLE: "sweep", SWEEP_ID: sweep_id})
        return run.info.run_id

    def trial_run(self, trial_id: str, name: str, parent_run_id: str | None) -> str:
        """The one run of this trial (under ``parent_run_id``): found again, or created."""
        condition = f"tags.`{TRIAL_ID}` = '{trial_id}' and tags.`{ROLE}` = 'trial'"
        if parent_run_id:
            condition += f" and tags.`{PARENT}` = '{parent_run_id}'"
        found = self._find(condition)
        if found is not None:
            if found.info.status != "RUNNING":
                self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        tags = {ROLE: "trial", TRIAL_ID: trial_id}
        if parent_run_id:
            tags[PARENT] = parent_run_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        """Log params not yet on the run (MLflow params cannot change once set)."""
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(key, str(value)[:6000]) for key, value in sorted(params.items()) if key not in existing]
        for start in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[start : start + 100])

    def _logged_steps(self, run_id: str) -> set[tuple[str, int]]:
        """The (metric, step) pairs the run holds: read from MLflow once, then kept up to date."""
        if run_id not in self._logged:
            keys = self.client.get_run(run_id).data.metrics
            self._logged[run_id] = {(key, m.step) for key in keys for m in self.client.get_metric_history(run_id, key)}
        return self._logged[run_id]

    def log_metrics(self, run_id: str, metrics: dict, step: int | None = None) -> None:
        """Log numeric, finite metrics at ``step`` (0 when None), skipping those the run holds."""
        from mlflow.entities import Metric

        logged = self._logged_steps(run_id)
        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step or 0)
            for key, value in sorted(metrics.items())
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (key, step or 0) not in logged
        ]
        for start in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[start : start + 500])
        logged.update((metric.key, metric.step) for metric in batch)

    def record(self, run_id: str, kind: str, payload: dict, step: int | None) -> None:
        """One report of ``trial.run_trial``: "params", "epoch" metrics (step = epoch), a finished
        "stage"'s metrics or "final"."""
        if kind == "params":
            self.log_params(run_id, payload)
        else:
            self.log_metrics(run_id, payload, step)

    def set_checkpoint(self, run_id: str, uri: str) -> None:
        self.client.set_tag(run_id, CHECKPOINT, uri)

    def trial_checkpoints(self, parent_run_id: str) -> dict[str, str]:
        """Trial id -> latest checkpoint, for the trial runs of a sweep that have one."""
        return {run.data.tags[TRIAL_ID]: run.data.tags[CHECKPOINT] for run in self.trial_runs(parent_run_id)
                if TRIAL_ID in run.data.tags and CHECKPOINT in run.data.tags}

    def finish(self, run_id: str, failed: bool = False) -> None:
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def trial_runs(self, parent_run_id: str) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT}` = '{parent_run_id}'", max_results=10000)
