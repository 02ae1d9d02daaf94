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

All writes go through ``Tracker``: ``MlflowClient`` with explicit run ids (no global "active
run"), from one process, the sweep driver. Reading goes through ``Reader``, which never writes: it
opens no store that does not exist and creates no experiment or run, so ``itl-ray report`` on a
wrong name or folder changes nothing. The tag names and role values below are the one home of
these conventions; other modules import them.

The sweep also tags each trial's run with the experiments of the study it belongs to
(``itl.experiments``, and the param ``experiment``) and its point (``itl.point``, ``itl.point_id``:
the trial without its seed), and keeps its plan on the parent run (``sweep_plan.json``).
"""

from __future__ import annotations

import math
import os
import posixpath
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from itl_ray.errors import UserError

DEFAULT_STORE = "itl_runs/mlflow.db"  # relative to the working directory
ROLE = "itl.role"  # tag: which kind of run, ROLE_SWEEP or ROLE_TRIAL
ROLE_SWEEP = "sweep"  # the parent run of one sweep
ROLE_TRIAL = "trial"  # the run of one trial, a child of its sweep's run
TRIAL_ID = "itl.trial_id"  # tag: config.trial_id of the trial's config (12 hex digits)
SWEEP_ID = "itl.sweep_id"  # tag on a sweep run: sweep.sweep_id of its trial list
PARENT = "mlflow.parentRunId"  # MLflow's own tag: a trial run's sweep run
CHECKPOINT = "itl.checkpoint"  # tag on a trial run: its latest checkpoint (path or URI)
EXPERIMENTS = "itl.experiments"  # a trial's experiments of the study, comma-separated (also param `experiment`)
POINT = "itl.point"  # the trial's point: its name without the seed (seeds repeat a point)
POINT_ID = "itl.point_id"  # an id of the trial's config without its seed
PLAN = "sweep_plan.json"  # artifact of the parent run: every trial the sweep plans, with its experiments
REPORT_FOLDER = "report"  # artifact folder of the parent run that `itl-ray report` fills


def tracking_uri(create: bool = True) -> str:
    """The tracking URI (contract: MLflow): ``MLFLOW_TRACKING_URI`` when set, else
    ``sqlite:///<cwd>/itl_runs/mlflow.db`` (absolute). With ``create``, the ``itl_runs`` folder is
    made so that a writer can open the store; a reader passes ``create=False``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path(DEFAULT_STORE).resolve()
    if create:
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
    """Fail fast when an MLflow server does not answer its ``/health`` within ``timeout`` seconds:
    a UserError naming the URI. Other URIs (sqlite, file) pass unchecked."""
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
    """The MLflow side of a sweep or a trial: the experiment ``experiment`` (created when missing)
    in the store at ``uri`` (default ``tracking_uri()``). Raises UserError when a server URI does
    not answer. Run ids are MLflow's 32-hex-digit ids."""

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
            found = self._find(f"tags.`{SWEEP_ID}` = '{sweep_id}' and tags.`{ROLE}` = '{ROLE_SWEEP}'")
            if found is None:
                raise UserError(f"--resume: no earlier sweep {name!r} with this spec in {self.uri}; run it without --resume")
            self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={ROLE: ROLE_SWEEP, SWEEP_ID: sweep_id})
        return run.info.run_id

    def trial_run(self, trial_id: str, name: str, parent_run_id: str | None, tags: dict[str, str] | None = None) -> str:
        """The one run of this trial (under ``parent_run_id``): found again, or created (with ``tags``)."""
        condition = f"tags.`{TRIAL_ID}` = '{trial_id}' and tags.`{ROLE}` = '{ROLE_TRIAL}'"
        if parent_run_id:
            condition += f" and tags.`{PARENT}` = '{parent_run_id}'"
        found = self._find(condition)
        if found is not None:
            if found.info.status != "RUNNING":
                self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        tags = {**(tags or {}), ROLE: ROLE_TRIAL, TRIAL_ID: trial_id}
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

    def log_artifacts(self, run_id: str, folder: str | Path, artifact_path: str | None = None) -> None:
        """Upload every file under ``folder`` to the run's artifacts, under ``artifact_path``
        (e.g. ``per_image``); a file already there is replaced. Raises FileNotFoundError when
        ``folder`` is not a folder."""
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"no folder {folder} to log as artifacts")
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def record(self, run_id: str, kind: str, payload: dict, step: int | None) -> None:
        """One report of ``trial.run_trial``: "params", "curve" metrics (step = iteration or epoch),
        a pretraining "checkpoint" (step = iteration), a finished "stage"'s metrics or "final"."""
        if kind == "params":
            self.log_params(run_id, payload)
        else:
            self.log_metrics(run_id, payload, step)

    def log_plan(self, run_id: str, plan: list[dict]) -> None:
        """The sweep's planned trials (id, name, experiments, point, seed) as the parent run's
        ``sweep_plan.json``: the report tells missing trials from trials never planned."""
        self.client.log_dict(run_id, plan, PLAN)

    def set_checkpoint(self, run_id: str, uri: str) -> None:
        """Name the trial's latest checkpoint (a folder path or URI) on its run (tag ``itl.checkpoint``),
        replacing the one named before."""
        self.client.set_tag(run_id, CHECKPOINT, uri)

    def trial_checkpoints(self, parent_run_id: str) -> dict[str, str]:
        """Trial id -> latest checkpoint, for the trial runs of a sweep that have one."""
        return {run.data.tags[TRIAL_ID]: run.data.tags[CHECKPOINT] for run in self.trial_runs(parent_run_id)
                if TRIAL_ID in run.data.tags and CHECKPOINT in run.data.tags}

    def finish(self, run_id: str, failed: bool = False) -> None:
        """End the run as FINISHED, or FAILED; a later ``trial_run`` of the same trial reopens it."""
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def trial_runs(self, parent_run_id: str) -> list:
        """The runs (``mlflow.entities.Run``) whose parent is ``parent_run_id``, at most 10,000."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT}` = '{parent_run_id}'", max_results=10000)


# ---------------------------------------------------------------------------------------------
# Reading (the report): never creates an experiment, a run or a store
# ---------------------------------------------------------------------------------------------

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


class Reader:
    """Read-only access to the runs of a tracking store: the report's and analysis' side (and
    logging the report's files on the parent run).

    ``uri`` defaults to ``tracking_uri(create=False)``. Opening refuses, with a UserError naming
    it, a sqlite store whose file does not exist (MLflow would create an empty one), a server that
    does not answer (no minutes of retries) and a file that is not an MLflow store. Nothing here
    creates a store, an experiment or a run; asking for an experiment that is not there lists those
    that hold sweeps.
    """

    def __init__(self, uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri(create=False)
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
        return self.client.search_runs(experiment_ids, filter_string=f"tags.`{ROLE}` = '{ROLE_SWEEP}'",
                                       order_by=["attributes.start_time DESC"], max_results=max_results)

    def _refresh(self, name: str) -> None:
        """Read the experiments again when ``name`` is not among those read (a newer one)."""
        if name not in self._experiments:
            self._experiments = {e.name: e for e in self.client.search_experiments()}

    def latest_sweep(self, experiment: str | None = None):
        """The most recent sweep run of ``experiment`` (default: of any experiment). Raises
        UserError listing the experiments that have sweeps."""
        ids = [self.experiment_id(experiment)] if experiment is not None else [
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

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``; a UserError listing the experiments with sweeps when the
        store has no such (active) experiment."""
        self._refresh(name)
        if name not in self._experiments:
            raise UserError(f"no experiment {name!r} in {self.uri}; {self._listing()}")
        return self._experiments[name].experiment_id

    def experiment_of(self, run) -> str:
        """The name of the experiment a run (``mlflow.entities.Run``) belongs to."""
        return self.experiment_name(run.info.experiment_id)

    def trial_runs(self, sweep_run_id: str) -> list:
        """The trial runs (``mlflow.entities.Run``) of one sweep run, oldest first."""
        experiment_id = self.client.get_run(sweep_run_id).info.experiment_id
        return self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{ROLE}` = '{ROLE_TRIAL}' and tags.`{PARENT}` = '{sweep_run_id}'",
            order_by=["attributes.start_time ASC"], max_results=50000)

    def runs_frame(self, experiment: str, sweep_run_id: str | None = None, role: str = ROLE_TRIAL):
        """One ``mlflow.search_runs`` call: a pandas DataFrame, one row per run of ``role`` in
        ``experiment`` (only the children of ``sweep_run_id`` when given), oldest first, with
        MLflow's columns ``run_id``, ``status``, ``start_time``, ``artifact_uri``, ``params.<name>``
        (strings), ``metrics.<name>`` (floats, NaN where a run lacks one) and ``tags.<name>``."""
        import mlflow

        condition = f"tags.`{ROLE}` = '{role}'"
        if sweep_run_id:
            condition += f" and tags.`{PARENT}` = '{sweep_run_id}'"
        experiment_id = self.experiment_id(experiment)
        # mlflow.search_runs reads the process-wide URI, and setting it also sets the environment
        # variable; both go back as they were (None: unset, MLflow's default resolution).
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        try:
            return mlflow.search_runs([experiment_id], filter_string=condition, max_results=100_000,
                                      order_by=["attributes.start_time ASC"])
        finally:
            mlflow.set_tracking_uri(previous)

    def plan(self, parent_run_id: str) -> list[dict] | None:
        """The sweep's planned trials (``sweep_plan.json`` of its parent run), or None without one."""
        import json

        if PLAN not in self.artifact_paths(parent_run_id, ""):
            return None
        return json.loads(self.download(parent_run_id, PLAN, self._scratch()).read_text())

    def artifact_paths(self, run_id: str, folder: str) -> list[str]:
        """Paths of the files directly in a run's artifact ``folder`` ("" for the top)."""
        return [item.path for item in self.client.list_artifacts(run_id, folder or None) if not item.is_dir]

    def download(self, run_id: str, artifact_path: str, destination: str | Path) -> Path:
        """Copy the run's artifact ``artifact_path`` (a file or a folder, e.g. ``per_image``) into
        ``destination`` (made if needed); returns the local path. A UserError names a run that has
        no such artifact."""
        wanted = artifact_path.strip("/")
        listed = {entry.path for entry in self.client.list_artifacts(run_id, posixpath.dirname(wanted) or None)}
        if wanted not in listed:
            raise UserError(f"run {run_id} has no artifact {artifact_path!r}")
        Path(destination).mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, wanted, str(destination)))

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
