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

How runs look in MLflow's UI: the experiment is created as a model-training experiment (MLflow 3's
tag ``mlflow.experimentKind``) with a saved view, ``trials``: the trial runs, listed flat, with the
study's params and headline metrics as columns. MLflow 3.17's UI opens an experiment in the mode
of its sidebar switch (GenAI or Model training), so the address ``ui_hint`` prints asks for model
training and that view. A trial run has each fact once as a param (``experiment``: the study's
experiments it belongs to, ``num_classes``, ``images_per_class``, ``label_set``, ``seed``,
``subset_hash``, ``pretrain_images`` and the other settings of its config); identity hashes that
are no axis to compare along are tags (``itl.trial_id``, ``itl.label_set_hash``). Metric names
follow the groups of MLflow's chart view: headline metrics at the top level, per-class APs under
``voc07_det_ap/`` and ``voc12_act_ap/``, timers under ``seconds/``, curves under their stage
(``pretrain/loss``, ``detection/lr``, ...); values are rounded to what they mean (``rounded``).
A run's end is its trial's end: finishing it again (the sweep's closing replay) keeps that time.

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

import contextlib
import fcntl
import json
import math
import os
import posixpath
import re
import shlex
import sys
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
LABEL_SET_HASH = "itl.label_set_hash"  # tag on a trial run: trial.label_set_hash of its labels
DESCRIPTION = "mlflow.note.content"  # MLflow's own tag: the description shown on a run's (or experiment's) page
EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow 3's experiment tag: which page the UI opens it on
TRAINING_KIND = "custom_model_development"  # its "model training" kind: the runs table, not the GenAI overview
VIEW = "trials"  # the experiment's saved UI view (tag mlflow.sharedViewState.trials): the trial runs, key columns
# A trial's "params" report: these are identity hashes, recorded as tags rather than params so that
# they are no axis of the compare view's plots.
TAGGED_PARAMS = {"trial_id": TRIAL_ID, "label_set_hash": LABEL_SET_HASH}
VIEW_PARAMS = ("num_classes", "images_per_class", "label_set", "seed", "pretrain_images")  # columns of the view
PERCENT_GROUPS = ("voc07_det_ap", "voc12_act_ap", "sun397_acc")  # per-class or per-partition values, in percent


def rounded(name: str, value: float) -> float:
    """A metric's value as recorded: timers (``seconds/...``) to 0.1 s; headline metrics (no
    "/" in the name) and the per-class and per-partition groups (``voc07_det_ap/<class>``, ...),
    all in percent, to 0.01; curves (``pretrain/loss``, ``detection/lr``, ...) to 4 significant
    digits, so that a small learning rate stays what it is."""
    group = name.split("/", 1)[0] if "/" in name else None
    if group == "seconds":
        return round(value, 1)
    if group is None or group in PERCENT_GROUPS:
        return round(value, 2)
    return float(f"{value:.4g}")


def _view_state() -> str:
    """The experiment's saved view as the MLflow UI reads it (a shared view state, JSON): only the
    trial runs, listed flat rather than folded under their sweep run (the UI folds children only
    when there is no filter or the order is by date), best pretraining top-1 first, with the
    study's params and the headline metrics as columns."""
    from itl_ray.metrics import FINAL_METRICS

    columns = ([f"params.`{name}`" for name in VIEW_PARAMS] + [f"metrics.`{name}`" for name in FINAL_METRICS])
    return json.dumps({"searchFilter": f"tags.`{ROLE}` = '{ROLE_TRIAL}'", "orderByKey": f"metrics.`{FINAL_METRICS[0]}`",
                       "orderByAsc": False, "selectedColumns": columns})


def tracking_uri(create: bool = True) -> str:
    """The tracking URI (contract: MLflow): ``MLFLOW_TRACKING_URI`` when set, else
    ``sqlite:///<cwd>/itl_runs/mlflow.db`` (absolute). With ``create``, the ``itl_runs`` folder is
    made so that a writer can open the store; a reader passes ``create=False``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if _local_path(uri) is not None:
            raise UserError(f"MLFLOW_TRACKING_URI={uri} names a folder (MLflow's file store, which MLflow 3 refuses unless "
                            "told); set it to a database, e.g. sqlite:////ABSOLUTE/PATH/mlflow.db, or to a server, "
                            "http://HOST:PORT")
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
def _store_lock(store: Path, make: bool = True):
    """An exclusive lock on ``<store>.lock`` while a process creates or migrates the store (the
    lock file is made unless ``make`` is false: a reader). Where it cannot be opened (a read-only
    folder: a store there cannot be migrated either), none is taken."""
    try:
        handle = open(store.with_name(store.name + ".lock"), "a" if make else "r")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_client(uri: str, reader: bool = False):
    """An ``MlflowClient`` on ``uri`` whose store is ready to write. A new sqlite store is created
    and migrated here, by one process at a time (an exclusive lock on ``<file>.lock``): MLflow
    creates the tables of a store it finds empty and does so without a lock, so writers opening a
    fresh store together ran its migrations side by side ("duplicate column name", "table ...
    already exists"). A store that is complete is only read here (MLflow checks its schema). A
    ``reader`` waits for a writer's lock but makes no lock file."""
    from mlflow.tracking import MlflowClient

    store = sqlite_file(uri)
    if store is None:
        return MlflowClient(tracking_uri=uri)
    with _store_lock(store, make=not reader):
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
        self.experiment_id = self._experiment(experiment, create)

    def _experiment(self, name: str, create: bool) -> str | None:
        """The id of experiment ``name``, created (with ``create``; else None) as a model-training
        experiment with the saved view ``trials`` when missing; an older one gets the tags it lacks.
        UserError for an experiment deleted in MLflow."""
        tags = {EXPERIMENT_KIND: TRAINING_KIND, f"mlflow.sharedViewState.{VIEW}": _view_state()}
        found = self.client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage != "active":
            raise UserError(deleted_experiment_message(name, found.experiment_id, self.uri))
        if found is None:
            if not create:
                return None
            return self.client.create_experiment(name, artifact_location=artifact_location(self.uri, name),
                                                 tags=tags)
        for key, value in tags.items():
            if found.tags.get(key) != value:
                self.client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def describe(self, run_id: str, text: str) -> None:
        """Set the run's description (MLflow's note, shown on its page); the experiment gets it too
        when it has none."""
        if not text:
            return
        self.client.set_tag(run_id, DESCRIPTION, text)
        if not self.client.get_experiment(self.experiment_id).tags.get(DESCRIPTION):
            self.client.set_experiment_tag(self.experiment_id, DESCRIPTION, text)

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

    def trial_run(self, trial_id: str, name: str, parent_run_id: str | None, tags: dict[str, str] | None = None) -> str:
        """The one run of this trial (under ``parent_run_id``): found again, or created (with
        ``tags``). A run found again is reopened (status RUNNING) unless it FINISHED: a finished
        trial's run keeps its end, also when a resumed sweep passes over the trial once more."""
        condition = f"tags.`{TRIAL_ID}` = '{trial_id}' and tags.`{ROLE}` = '{ROLE_TRIAL}'"
        if parent_run_id:
            condition += f" and tags.`{PARENT}` = '{parent_run_id}'"
        found = self._find(condition)
        if found is not None:
            if found.info.status not in ("RUNNING", "FINISHED"):
                self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        tags = {**(tags or {}), ROLE: ROLE_TRIAL, TRIAL_ID: trial_id}
        if parent_run_id:
            tags[PARENT] = parent_run_id
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        """Log params not yet on the run (MLflow params cannot change once set); the keys of
        ``TAGGED_PARAMS`` become tags instead."""
        from mlflow.entities import Param, RunTag

        run = self.client.get_run(run_id)
        existing = run.data.params
        tags = [RunTag(TAGGED_PARAMS[key], str(value)) for key, value in sorted(params.items())
                if key in TAGGED_PARAMS and run.data.tags.get(TAGGED_PARAMS[key]) != str(value)]
        if tags:
            self.client.log_batch(run_id, tags=tags)
        new = [Param(key, str(value)[:6000]) for key, value in sorted(params.items())
               if key not in existing and key not in TAGGED_PARAMS]
        for start in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[start : start + 100])

    def _logged_steps(self, run_id: str) -> set[tuple[str, int]]:
        """The (metric, step) pairs the run holds: read from MLflow once, then kept up to date."""
        if run_id not in self._logged:
            keys = self.client.get_run(run_id).data.metrics
            self._logged[run_id] = {(key, m.step) for key in keys for m in self.client.get_metric_history(run_id, key)}
        return self._logged[run_id]

    def log_metrics(self, run_id: str, metrics: dict, step: int | None = None) -> None:
        """Log numeric, finite metrics at ``step`` (0 when None), ``rounded``, skipping those the
        run holds. The headline metrics go first (MLflow lists a run's metrics in the order they
        first arrived; its parallel-coordinates plot starts from the first one all runs share)."""
        from mlflow.entities import Metric

        from itl_ray.metrics import FINAL_METRICS

        logged = self._logged_steps(run_id)
        now = int(time.time() * 1000)
        first = {name: index for index, name in enumerate(FINAL_METRICS)}
        batch = [
            Metric(key, rounded(key, float(value)), now, step or 0)
            for key, value in sorted(metrics.items(), key=lambda item: (first.get(item[0], len(first)), item[0]))
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

    def log_trial_files(self, run_id: str, folder: str | Path, files: tuple[str, ...],
                        folders: tuple[str, ...]) -> None:
        """Upload the trial's record from its working folder (or a checkpoint of it): each of
        ``files`` that exists, at the artifacts' top level, and each of ``folders`` that exists
        (e.g. ``per_image``) under its own name. Uploading again replaces them."""
        folder = Path(folder)
        for name in files:
            if (folder / name).is_file():
                self.client.log_artifact(run_id, str(folder / name))
        for name in folders:
            if (folder / name).is_dir():
                self.client.log_artifacts(run_id, str(folder / name), name)

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

    def finish(self, run_id: str, failed: bool = False, killed: bool = False) -> None:
        """End the run as FINISHED, FAILED, or KILLED (stopped by a signal, to be resumed), now; a
        run that has ended already keeps its end time (a second call changes at most its status).
        A later ``trial_run`` of the same trial reopens a run that did not finish."""
        status = "KILLED" if killed else "FAILED" if failed else "FINISHED"
        info = self.client.get_run(run_id).info
        if info.status == "RUNNING" or not info.end_time:
            self.client.set_terminated(run_id, status=status)
        elif info.status != status:
            self.client.set_terminated(run_id, status=status, end_time=info.end_time)

    def running_runs(self, parent_run_id: str) -> list[str]:
        """Ids of the sweep run ``parent_run_id`` and its trial runs that are still RUNNING."""
        runs = [run.info.run_id for run in self.trial_runs(parent_run_id) if run.info.status == "RUNNING"]
        return runs + ([parent_run_id] if self.client.get_run(parent_run_id).info.status == "RUNNING" else [])

    def trial_runs(self, parent_run_id: str) -> list:
        """The runs (``mlflow.entities.Run``) whose parent is ``parent_run_id``, at most 10,000."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT}` = '{parent_run_id}'", max_results=10000)


def ui_hint(experiment: str, uri: str | None = None) -> str:
    """How to look at the experiment's runs in MLflow's UI: for a local store, the command that
    starts the UI on it (this environment's ``mlflow``, shell-quoted so that paths with spaces
    work) and the address of the experiment's ``trials`` view; for a tracking server, that
    server's address of the view. Without the experiment in the store: the UI's home."""
    uri = uri or tracking_uri(create=False)
    server = uri.startswith(("http://", "https://"))
    base = uri.rstrip("/") if server else "http://127.0.0.1:5000"  # `mlflow ui` listens there by default
    try:
        found = Reader(uri).client.get_experiment_by_name(experiment)
    except UserError:
        found = None
    # workflowType: the UI's "Model training" mode (it starts in GenAI, whatever the experiment's kind)
    address = (f"{base}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={VIEW}"
               if found else f"{base}/")
    if server:
        return f"open {address}"
    mlflow = Path(sys.executable).with_name("mlflow")
    command = shlex.quote(str(mlflow)) if mlflow.is_file() else "mlflow"
    return f"{command} ui --backend-store-uri {shlex.quote(uri)}\n  then open {address}"


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
        self.uri = uri or tracking_uri(create=False)
        _check_openable(self.uri)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per download otherwise
        try:
            self.client = open_client(self.uri, reader=True)  # not while a writer creates the store
            self._experiments = {e.name: e for e in self.client.search_experiments()}
        except Exception as error:  # a file that is not an MLflow database, a refused connection
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
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
            return "no experiment holds one yet: run `itl-ray sweep SPEC` first"
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
