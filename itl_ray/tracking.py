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

The sweep also tags each trial's run with the experiments of the study it belongs to
(``itl.experiments``, and the param ``experiment``) and its point (``itl.point``, ``itl.point_id``:
the trial without its seed), and keeps its plan on the parent run (``sweep_plan.json``). ``Store``
is the reading side, for ``itl-ray report``: it opens a store only when it is there (never creates
one, an experiment or a run), lists the experiments that have sweeps, returns a sweep's trial runs
as one pandas frame, reads their artifacts, and logs the report's files on the parent run.
"""

from __future__ import annotations

import math
import os
import re
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
EXPERIMENTS = "itl.experiments"  # a trial's experiments of the study, comma-separated (also param `experiment`)
POINT = "itl.point"  # the trial's point: its name without the seed (seeds repeat a point)
POINT_ID = "itl.point_id"  # an id of the trial's config without its seed
PLAN = "sweep_plan.json"  # artifact of the parent run: every trial the sweep plans, with its experiments
REPORT_FOLDER = "report"  # artifact folder of the parent run that `itl-ray report` fills


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path(DEFAULT_STORE).resolve()
    store.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store, in ``artifacts/<name>``
    (MLflow's own default is ``./mlruns`` in whatever folder the first run started); a server
    decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = Path(uri[len("sqlite:///"):]).parent
    return (folder / "artifacts" / re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)).resolve().as_uri()


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
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(
            experiment, artifact_location=artifact_location(self.uri, experiment))
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

    def trial_run(self, trial_id: str, name: str, parent_run_id: str | None, tags: dict[str, str] | None = None) -> str:
        """The one run of this trial (under ``parent_run_id``): found again, or created (with ``tags``)."""
        condition = f"tags.`{TRIAL_ID}` = '{trial_id}' and tags.`{ROLE}` = 'trial'"
        if parent_run_id:
            condition += f" and tags.`{PARENT}` = '{parent_run_id}'"
        found = self._find(condition)
        if found is not None:
            if found.info.status != "RUNNING":
                self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        tags = {**(tags or {}), ROLE: "trial", TRIAL_ID: trial_id}
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

    def log_plan(self, run_id: str, plan: list[dict]) -> None:
        """The sweep's planned trials (id, name, experiments, point, seed) as the parent run's
        ``sweep_plan.json``: the report tells missing trials from trials never planned."""
        self.client.log_dict(run_id, plan, PLAN)

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


# ---------------------------------------------------------------------------------------------
# Reading (the report): never creates an experiment, a run or a store
# ---------------------------------------------------------------------------------------------

def store_uri() -> str:
    """The tracking URI as ``tracking_uri`` gives it, without creating the ``itl_runs`` folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_STORE).resolve()}"


def _check_openable(uri: str) -> None:
    """Fail fast, naming ``uri``: a sqlite file that is not there (opening would create it), a
    server that does not answer (MLflow itself would retry for minutes)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            hint = ("run the report where the sweep ran, or set MLFLOW_TRACKING_URI"
                    if not os.environ.get("MLFLOW_TRACKING_URI") else "check MLFLOW_TRACKING_URI")
            raise UserError(f"MLflow store {uri} does not exist ({path} is not a file); {hint}")
    elif uri.startswith(("http://", "https://")):
        # One health check, then no retries: a server that went away fails in seconds.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        check_reachable(uri)


def _local_path(uri: str) -> Path | None:
    """The folder a ``file:`` URI or a plain path names; None for remote artifact stores."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:3] == ":\\"):  # a path (or a Windows drive)
        return Path(uri)
    return None


class Store:
    """Read access to the tracking store for the report (and logging the report's files on the
    parent run). Opening checks the store first and never creates one; asking for an experiment
    that is not there lists those that are."""

    def __init__(self, uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri or store_uri()
        _check_openable(self.uri)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download otherwise
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self._experiments = {e.name: e for e in self.client.search_experiments()}
        except Exception as error:  # a file that is not an MLflow database, a refused connection
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise UserError(f"cannot open MLflow store {self.uri}: {first}") from None

    def experiment_names(self) -> list[str]:
        """Experiments holding at least one sweep, most recent sweep first."""
        sweeps = self._sweeps([e.experiment_id for e in self._experiments.values()], max_results=10000)
        by_id = {e.experiment_id: name for name, e in self._experiments.items()}
        names: list[str] = []
        for run in sweeps:
            name = by_id.get(run.info.experiment_id)
            if name and name not in names:
                names.append(name)
        return names

    def _sweeps(self, experiment_ids: list[str], max_results: int = 1):
        if not experiment_ids:
            return []
        return self.client.search_runs(experiment_ids, filter_string=f"tags.`{ROLE}` = 'sweep'",
                                       order_by=["attributes.start_time DESC"], max_results=max_results)

    def latest_sweep(self, experiment: str | None = None):
        """The most recent sweep run of ``experiment`` (default: of any experiment). Raises
        UserError listing the experiments that have sweeps."""
        if experiment is not None and experiment not in self._experiments:
            raise UserError(f"no experiment {experiment!r} in {self.uri}; {self._listing()}")
        ids = [self._experiments[experiment].experiment_id] if experiment else [
            e.experiment_id for e in self._experiments.values()]
        found = self._sweeps(ids)
        if not found:
            what = f"experiment {experiment!r}" if experiment else "the store"
            raise UserError(f"{what} in {self.uri} holds no sweep; {self._listing()}")
        return found[0]

    def _listing(self) -> str:
        names = self.experiment_names()
        if not names:
            return "it holds no sweep yet: run `itl-ray sweep SPEC` first"
        return "experiments with sweeps: " + ", ".join(names) + " (itl-ray report --experiment NAME)"

    def experiment_name(self, experiment_id: str) -> str:
        return next(name for name, e in self._experiments.items() if e.experiment_id == experiment_id)

    def trial_runs(self, experiment_id: str, parent_run_id: str):
        """The sweep's trial runs as a pandas DataFrame (one ``mlflow.search_runs`` call): columns
        ``run_id``, ``status``, ``params.*``, ``metrics.*``, ``tags.*`` as MLflow names them."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        return mlflow.search_runs(
            experiment_ids=[experiment_id], max_results=100_000, output_format="pandas",
            filter_string=f"tags.`{PARENT}` = '{parent_run_id}' and tags.`{ROLE}` = 'trial'")

    def plan(self, parent_run_id: str) -> list[dict] | None:
        """The sweep's planned trials (``sweep_plan.json`` of its parent run), or None without one."""
        import json

        if PLAN not in self.artifact_paths(parent_run_id, ""):
            return None
        return json.loads(self.download(parent_run_id, PLAN, self._scratch()).read_text())

    def artifact_paths(self, run_id: str, folder: str) -> list[str]:
        """Paths of the files directly in a run's artifact ``folder`` ("" for the top)."""
        return [item.path for item in self.client.list_artifacts(run_id, folder or None) if not item.is_dir]

    def download(self, run_id: str, path: str, destination: str | Path) -> Path:
        """Download one artifact (file or folder) of a run into ``destination``; returns its local path."""
        Path(destination).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, path, str(destination)))

    def run_folder(self, artifact_uri: str, folder: str, destination: str | Path) -> Path | None:
        """A run's artifact ``folder`` (``artifact_uri``: the run's, as ``trial_runs`` lists it) as
        a local folder: read where it lies when the artifact store is local, else downloaded into
        ``destination``. None when the run has no such folder."""
        local = _local_path(artifact_uri)
        if local is not None:
            path = local / folder
            return path if path.is_dir() and any(path.iterdir()) else None
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        try:
            path = Path(download_artifacts(artifact_uri=f"{artifact_uri.rstrip('/')}/{folder}",
                                           dst_path=str(destination)))
        except (MlflowException, OSError):
            return None
        return path if path.is_dir() and any(path.iterdir()) else None

    def _scratch(self) -> str:
        import tempfile

        if not hasattr(self, "_scratch_dir"):
            self._scratch_dir = tempfile.TemporaryDirectory(prefix="itl-report-")
        return self._scratch_dir.name

    def log_report(self, parent_run_id: str, folder: str | Path) -> None:
        """The report's files as artifacts of the sweep's parent run, under ``report/``."""
        self.client.log_artifacts(parent_run_id, str(folder), REPORT_FOLDER)
