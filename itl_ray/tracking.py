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
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import posixpath
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


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to the working directory unless the
    path after the three slashes is absolute), or None for another kind of store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


def check_writable_store(uri: str) -> None:
    """Refuse a sqlite store a writer cannot write, before anything starts: its folder (or the
    nearest existing parent; sqlite writes its journal there) and the file when it exists must be
    writable; nothing is left behind. A UserError names the path and the operating system's
    reason. Other URIs pass unchecked."""
    from itl_ray.files import check_writable

    store = sqlite_file(uri)
    if store is None:
        return
    check_writable(store.parent, f"the MLflow store's folder (of {uri})")
    if store.exists():
        try:
            with open(store, "r+b"):
                pass
        except OSError as error:
            raise UserError(f"cannot write the MLflow store {store} ({error.strerror}); make it writable "
                            "or set MLFLOW_TRACKING_URI to another store") from None


@contextlib.contextmanager
def _store_lock(store: Path):
    """An exclusive lock on ``<store>.lock`` while a process creates or migrates the store."""
    with open(store.with_name(store.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_client(uri: str):
    """An ``MlflowClient`` on ``uri`` whose store is ready to write. A new sqlite store is created
    and migrated here, by one process at a time (an exclusive lock on ``<file>.lock``): MLflow
    creates the tables of a store it finds empty and does so without a lock, so writers opening a
    fresh store together ran its migrations side by side ("duplicate column name", "table ...
    already exists"). A store that is complete is only read here (MLflow checks its schema)."""
    from mlflow.tracking import MlflowClient

    store = sqlite_file(uri)
    if store is None:
        return MlflowClient(tracking_uri=uri)
    with _store_lock(store):
        return MlflowClient(tracking_uri=uri)  # opens the store (once per process): creates and migrates it when new


# What sqlite says when it cannot write its file (a full or read-only disk, a forbidden folder).
STORE_WRITE_FAILURES = ("readonly database", "database or disk is full", "unable to open database file",
                        "disk i/o error")


def store_error(error: BaseException, uri: str) -> str | None:
    """One line for an error in ``error``'s chain that says the sqlite store cannot be written
    ("cannot write the MLflow store <uri>: attempt to write a readonly database"), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).lower()
        for failure in STORE_WRITE_FAILURES:
            if failure in text:
                return f"cannot write the MLflow store {uri}: {failure}"
        error = error.__cause__ or error.__context__
    return None


def deleted_experiment_message(name: str, experiment_id: str, uri: str) -> str:
    """What to do about a sweep whose experiment was deleted in MLflow (it keeps its name until
    purged)."""
    return (f"MLflow experiment {name!r} (id {experiment_id}) in {uri} was deleted; restore it with "
            f"`MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {experiment_id}`, or purge "
            f"it for good with `mlflow gc --backend-store-uri {uri} --experiment-ids {experiment_id}`, then run again")


class Tracker:
    """The MLflow side of a sweep or a trial: the experiment ``experiment`` in the store at ``uri``
    (default ``tracking_uri()``). Run ids are MLflow's 32-hex-digit ids.

    With ``create`` (a new sweep or trial) a missing store and experiment are created; without it
    (``--resume``) nothing is: ``experiment_id`` is None when there is no store or experiment to
    continue. Raises UserError, before anything is written, when a server does not answer, a sqlite
    store cannot be written, or the experiment was deleted in MLflow (the line says how to restore
    or purge it)."""

    def __init__(self, experiment: str, uri: str | None = None, create: bool = True):
        self.uri = uri or tracking_uri(create=create)
        self._logged: dict[str, set[tuple[str, int]]] = {}  # run id -> (metric, step) pairs it holds
        check_reachable(self.uri)
        store = sqlite_file(self.uri)
        if not create and store is not None and not store.is_file():
            self.client, self.experiment_id = None, None  # nothing to continue; nothing made
            return
        check_writable_store(self.uri)
        if store is not None:
            store.parent.mkdir(parents=True, exist_ok=True)
        self.client = open_client(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage != "active":
            raise UserError(deleted_experiment_message(experiment, found.experiment_id, self.uri))
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            self.experiment_id = self.client.create_experiment(experiment) if create else None

    def _find(self, filter_string: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def resumable_sweep(self, sweep_id: str, name: str):
        """The latest sweep run (``mlflow.entities.Run``) with ``sweep_id``, read only; a UserError
        when there is none (no store, no experiment, or no run of this spec)."""
        found = None
        if self.experiment_id is not None:
            found = self._find(f"tags.`{SWEEP_ID}` = '{sweep_id}' and tags.`{ROLE}` = '{ROLE_SWEEP}'")
        if found is None:
            raise UserError(f"--resume: no earlier sweep {name!r} with this spec in {self.uri}; run it without --resume")
        return found

    def sweep_run(self, sweep_id: str, name: str, resume: bool) -> str:
        """The parent run: the latest one of this sweep when resuming, else a new one."""
        if resume:
            found = self.resumable_sweep(sweep_id, name)
            self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={ROLE: ROLE_SWEEP, SWEEP_ID: sweep_id})
        return run.info.run_id

    def trial_run(self, trial_id: str, name: str, parent_run_id: str | None) -> str:
        """The one run of this trial (under ``parent_run_id``): found again, or created."""
        condition = f"tags.`{TRIAL_ID}` = '{trial_id}' and tags.`{ROLE}` = '{ROLE_TRIAL}'"
        if parent_run_id:
            condition += f" and tags.`{PARENT}` = '{parent_run_id}'"
        found = self._find(condition)
        if found is not None:
            if found.info.status != "RUNNING":
                self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        tags = {ROLE: ROLE_TRIAL, TRIAL_ID: trial_id}
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
        """One report of ``trial.run_trial``: "params", "epoch" metrics (step = epoch), a finished
        "stage"'s metrics or "final"."""
        if kind == "params":
            self.log_params(run_id, payload)
        else:
            self.log_metrics(run_id, payload, step)

    def set_checkpoint(self, run_id: str, uri: str) -> None:
        """Name the trial's latest checkpoint (a folder path or URI) on its run (tag ``itl.checkpoint``),
        replacing the one named before."""
        self.client.set_tag(run_id, CHECKPOINT, uri)

    def trial_checkpoints(self, parent_run_id: str) -> dict[str, str]:
        """Trial id -> latest checkpoint, for the trial runs of a sweep that have one."""
        return {run.data.tags[TRIAL_ID]: run.data.tags[CHECKPOINT] for run in self.trial_runs(parent_run_id)
                if TRIAL_ID in run.data.tags and CHECKPOINT in run.data.tags}

    def finish(self, run_id: str, failed: bool = False, killed: bool = False) -> None:
        """End the run as FINISHED, FAILED, or KILLED (stopped by a signal, to be resumed); a later
        ``trial_run`` of the same trial reopens it."""
        self.client.set_terminated(run_id, status="KILLED" if killed else "FAILED" if failed else "FINISHED")

    def running_runs(self, parent_run_id: str) -> list[str]:
        """Ids of the sweep run ``parent_run_id`` and its trial runs that are still RUNNING."""
        runs = [run.info.run_id for run in self.trial_runs(parent_run_id) if run.info.status == "RUNNING"]
        return runs + ([parent_run_id] if self.client.get_run(parent_run_id).info.status == "RUNNING" else [])

    def trial_runs(self, parent_run_id: str) -> list:
        """The runs (``mlflow.entities.Run``) whose parent is ``parent_run_id``, at most 10,000."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT}` = '{parent_run_id}'", max_results=10000)


class Reader:
    """Read-only access to the runs of a tracking store (the report's and analysis' side).

    ``uri`` defaults to ``tracking_uri(create=False)``. Opening refuses, with a UserError naming
    it, a sqlite store whose file does not exist (MLflow would create an empty one) and a server
    that does not answer. Nothing here creates a store, an experiment or a run.
    """

    def __init__(self, uri: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = uri or tracking_uri(create=False)
        if self.uri.startswith("sqlite:///"):
            store = Path(self.uri[len("sqlite:///"):])
            if not store.is_file():
                if uri or os.environ.get("MLFLOW_TRACKING_URI"):
                    raise UserError(f"no MLflow store at {self.uri} ({store} does not exist); check the URI "
                                    "(MLFLOW_TRACKING_URI)")
                raise UserError(f"no MLflow store here ({store} does not exist): run the report where the sweep "
                                "ran, or set MLFLOW_TRACKING_URI")
        check_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)

    def experiment_names(self) -> list[str]:
        """Names of the store's active experiments, sorted."""
        return sorted(experiment.name for experiment in self.client.search_experiments())

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``; a UserError that lists the existing ones when it has none."""
        found = self.client.get_experiment_by_name(name)
        if found is None or found.lifecycle_stage != "active":
            known = ", ".join(self.experiment_names()) or "none"
            raise UserError(f"no experiment {name!r} in {self.uri}; experiments there: {known}")
        return found.experiment_id

    def latest_sweep(self, experiment: str | None = None):
        """The most recently started sweep run (``mlflow.entities.Run``) of ``experiment``, or of
        any experiment when None; a UserError when there is none."""
        if experiment is None:
            ids = [found.experiment_id for found in self.client.search_experiments()]
        else:
            ids = [self.experiment_id(experiment)]
        runs = self.client.search_runs(ids, filter_string=f"tags.`{ROLE}` = '{ROLE_SWEEP}'",
                                       order_by=["attributes.start_time DESC"], max_results=1) if ids else []
        if not runs:
            where = f"experiment {experiment!r}" if experiment else self.uri
            raise UserError(f"{where} holds no sweep run; run `itl-ray sweep SPEC` first")
        return runs[0]

    def experiment_of(self, run) -> str:
        """The name of the experiment a run belongs to."""
        return self.client.get_experiment(run.info.experiment_id).name

    def trial_runs(self, sweep_run_id: str) -> list:
        """The trial runs (``mlflow.entities.Run``) of one sweep run, oldest first."""
        experiment_id = self.client.get_run(sweep_run_id).info.experiment_id
        return self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{ROLE}` = '{ROLE_TRIAL}' and tags.`{PARENT}` = '{sweep_run_id}'",
            order_by=["attributes.start_time ASC"], max_results=50000)

    def runs_frame(self, experiment: str, sweep_run_id: str | None = None, role: str = ROLE_TRIAL):
        """One ``mlflow.search_runs`` call: a pandas DataFrame, one row per run of ``role`` in
        ``experiment`` (only the children of ``sweep_run_id`` when given), oldest first, with
        MLflow's columns ``run_id``, ``status``, ``start_time``, ``params.<name>`` (strings),
        ``metrics.<name>`` (floats, NaN where a run lacks one) and ``tags.<name>``."""
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
            return mlflow.search_runs([experiment_id], filter_string=condition,
                                      order_by=["attributes.start_time ASC"])
        finally:
            mlflow.set_tracking_uri(previous)

    def download(self, run_id: str, artifact_path: str, destination: str | Path) -> Path:
        """Copy the run's artifact ``artifact_path`` (a file or a folder, e.g. ``per_image``) into
        the existing folder ``destination``; returns the local path. A UserError names a run that
        has no such artifact."""
        import mlflow.artifacts

        wanted = artifact_path.strip("/")
        listed = {entry.path for entry in self.client.list_artifacts(run_id, posixpath.dirname(wanted) or None)}
        if wanted not in listed:
            raise UserError(f"run {run_id} has no artifact {artifact_path!r}")
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=wanted,
                                                    dst_path=str(destination), tracking_uri=self.uri)
        return Path(local)
