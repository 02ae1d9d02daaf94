"""A sweep with Ray Tune: one Tune trial per trial config, tracked in MLflow from the driver.

Ray is an adapter here: the trainable calls ``trial.run_trial`` and forwards its reports with
``tune.report``; a Tune callback on the driver writes them to MLflow (one writer, one run per
trial, found again by its trial id on a retry or resume). ``Tuner``, ``TuneConfig`` and
``RunConfig`` are built in ``run_sweep``, in one place.

Where a trial's state lives: the trial works in a node-local folder of its own (``working_folder``,
under the node's temporary folder). It is not Tune's trial directory: on the driver's node that one
lies inside the experiment folder the driver copies to storage in the background, which caught the
trial's files mid-rename. The trial reports its folder as a Tune checkpoint with every pretraining
checkpoint, finished stage and final result; ``tune.report`` copies it to ``spec.storage`` (a local path, or
s3:// on a cluster, which every node sees) before it returns, while the trial waits, so each
checkpoint is a consistent copy. A trial that Tune retries (``FailureConfig``), on this node or
another, starts from its last checkpoint; ``--resume`` starts each trial from the checkpoint that
its MLflow run names (tag ``itl.checkpoint``, set as each checkpoint arrives). Either way
pretraining resumes after its last checkpoint and finished transfer stages are skipped
(``trial.run_trial``). A lost node costs its trials the work since their last checkpoint: the node's worker
processes exit when its raylet is gone, Tune sees the trial's actor die and retries it elsewhere.

No metric is lost or doubled: the folder also keeps the trial's report log, and at the end of the
sweep every trial's log is recorded again; ``Tracker`` skips a metric step it already holds.

The console: the driver prints a progress line of the sweep (``console.SweepProgress``: trials
done, running, pending, time left) as trials start, end and report, and each trial's own lines as
they come, without Ray's log prefixes, de-duplication or colour codes (``console.quiet_ray``). Ray's storage keeps what
``--resume`` needs: each trial's latest checkpoint (the working folder: stage results, weights,
report log, record) and Tune's small state files; Tune's result loggers (JSON, CSV, TensorBoard)
are off, and pretraining's checkpoint leaves the folder once the weights are saved.

Stopping: SIGINT (Ctrl-C) or SIGTERM stops the sweep at the driver loop's next step (a tenth of a
second; a second signal at once): the running trials' MLflow runs and the sweep's are marked
KILLED, the Ray instance this driver started is shut down, and ``Interrupted`` reaches the command
line (exit 130 or 143). A disk that cannot be written (full, read-only) in the driver or a trial
stops the sweep the same way, with one line naming the path (``DiskError``). Either way ``--resume``
continues from the checkpoints MLflow names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from itl_ray import tables
from itl_ray.config import PlannedTrial, SweepSpec, TrialConfig, from_dict, to_dict, trial_id, trial_name
from itl_ray.console import SweepProgress, quiet_lost_sigterm, quiet_ray, say
from itl_ray.cost import Throughput, TrialCost, image_flops, throughput, trial_cost
from itl_ray.errors import Interrupted, UserError
from itl_ray.files import check_writable, describe_disk_error, disk_error
from itl_ray.metrics import FINAL_METRICS, INDUCTION_METRICS

REPORT_LOG = "reports.jsonl"  # in the trial's folder: every report of run_trial, one JSON line each
WORK_FOLDERS = "itl_ray_work"  # under each node's temporary folder: one working folder per trial attempt
CHECKPOINTED = ("checkpoint", "stage", "final")  # reports that carry the trial's folder as a checkpoint
STEPPED = ("curve", "checkpoint")  # reports whose metrics have a step (an iteration or an epoch)
# `ray up` writes the cluster's config here on the head node; its node types say how many GPUs
# a node can have, also before the autoscaler has started one.
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def varying_keys(spec: SweepSpec) -> list[str]:
    """The dotted keys that differ between the sweep's trials (see ``SweepSpec.varying_keys``)."""
    return spec.varying_keys()


def sweep_id(spec: SweepSpec) -> str:
    """12 hex digits identifying the sweep's trials (tag ``itl.sweep_id`` of its parent run):
    ``--resume`` continues the latest sweep run with the same id. Built from the trial ids, so it
    too ignores runtime settings and data paths (a sweep resumed with more workers, or with its
    prepared data moved, is the same sweep)."""
    text = json.dumps([trial_id(t) for t in spec.trials()])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def point_name(config: TrialConfig, keys: list[str]) -> str:
    """The trial's name without its seed: the point of the study it measures (seeds repeat it)."""
    return trial_name(config, [key for key in keys if key != "seed"])


def ordered_plan(spec: SweepSpec, speed: Throughput | None = None) -> list[tuple[PlannedTrial, TrialCost]]:
    """The sweep's trials with their estimated cost, longest first (so the slowest does not start
    last; ties keep the spec's order)."""
    speed = speed or throughput()
    costed = [(planned, trial_cost(planned.config, speed)) for planned in spec.planned()]
    return sorted(costed, key=lambda item: -item[1].gpu_hours)


def ordered_trials(spec: SweepSpec) -> list[TrialConfig]:
    """The trials, longest first: the order the sweep starts them and ``itl-ray trial --index`` counts."""
    return [planned.config for planned, _ in ordered_plan(spec)]


def dry_run(spec: SweepSpec, img_per_s: float | None = None) -> str:
    """The trials grouped by experiment, each with its pretraining images, iterations and GPU-hours,
    and the total (a trial shared by several experiments is listed in each, counted once). A trial
    id names the prepared data by content: where the data is not here, the ids are left out."""
    speed = throughput(img_per_s)
    plan = ordered_plan(spec, speed)
    keys = varying_keys(spec)
    names = spec.experiment_names()
    ids, missing = {}, None
    for index, (planned, _) in enumerate(plan):
        try:
            ids[index] = trial_id(planned.config)
        except UserError as error:
            ids[index], missing = "-", missing or str(error)
    shared = sum(len(planned.experiments) > 1 for planned, _ in plan)
    lines = [f"sweep {spec.trial.name!r}: {len(plan)} trials in {len(names)} experiment"
             f"{'s' if len(names) > 1 else ''}" + (f", {shared} shared by several" if shared else "")
             + (f"; seeds {spec.seeds}" if spec.seeds else "")]
    for name in names:
        rows = []
        for index, (planned, cost) in enumerate(plan):
            if name not in planned.experiments:
                continue
            others = [other for other in planned.experiments if other != name]
            rows.append({"index": index, "trial_id": ids[index],
                         "trial": trial_name(planned.config, keys), "pretrain images": f"{cost.pretrain_images:,}",
                         "iterations": f"{cost.iterations:,}", "GPU time": gpu_time(cost.gpu_hours),
                         "also in": ", ".join(others) or "-"})
        hours = sum(cost.gpu_hours for planned, cost in plan if name in planned.experiments)
        lines += ["", f"experiment {name}: {len(rows)} trials, ~{gpu_time(hours)} on one GPU",
                  tables.to_text(pd.DataFrame(rows))]
    pretrain = sum(cost.pretrain_gpu_hours for _, cost in plan)
    transfer = sum(cost.transfer_gpu_hours for _, cost in plan)
    lines += ["", f"total: {len(plan)} trials, ~{pretrain + transfer:.3g} GPU-hours ("
                  f"pretraining {gpu_time(pretrain)}, transfer fine-tuning {gpu_time(transfer)}), each trial on one GPU",
              f"throughput: {speed.source}; scaled to each trial's network by FLOPs (see itl_ray/cost.py)"]
    if any(image_flops(p.config.model.width, p.config.model.resolution) < 0.1 * image_flops(speed.width, speed.resolution)
           for p, _ in plan):
        lines.append("small networks: a GPU does not reach FLOP-scaled speed on them (kernel launches, input "
                     "pipeline), so their times are lower bounds")
    if any(cost.nominal for _, cost in plan):
        lines.append(f"pretraining images: ILSVRC-2012's nominal counts (data.imagenet={spec.trial.data.imagenet} "
                     "is not a prepared dataset here)")
    if missing:
        lines.append(f"trial ids: they name the prepared data by content, which is not here ({missing})")
    lines.append("nothing was started (--dry-run); `itl-ray trial SPEC --index N` runs trial N alone")
    return "\n".join(lines)


def gpu_time(hours: float) -> str:
    """A duration with its unit and two significant digits (an estimate is not more precise)."""
    if hours >= 1:
        return f"{hours:,.2g} h" if hours < 10 else f"{hours:,.0f} h"
    if hours * 60 >= 1:
        return f"{hours * 60:.2g} min"
    return f"{hours * 3600:.2g} s"


def storage_root(storage: str) -> str:
    """``spec.storage`` as Ray takes it: a URI (s3://, gs://) as it is, a local path made absolute."""
    return storage.rstrip("/") if "://" in storage else str(Path(storage).expanduser().resolve())


# ---------------------------------------------------------------------------------------------
# CPUs and GPUs: refuse a trial no node can hold (Tune would wait for it forever)
# ---------------------------------------------------------------------------------------------

SETTINGS = {"CPU": "cpus_per_trial", "GPU": "gpus_per_trial"}  # Ray's resource -> its setting


def check_fits(resource: str, per_trial: float, alive_nodes: list[float], node_types: dict[str, float | None]) -> None:
    """UserError, with both numbers, when a trial asks for more of ``resource`` ("CPU" or "GPU")
    than the largest node has. ``alive_nodes``: the amount on each node now in the cluster;
    ``node_types``: on each node type the autoscaler can start (empty without an autoscaler; None
    where a type does not declare it and the autoscaler detects it: then no node type is ruled
    out)."""
    if any(amount is None for amount in node_types.values()):
        return
    largest = max([*alive_nodes, *node_types.values()], default=0.0)
    if per_trial > largest:
        setting = SETTINGS[resource]
        types = ", ".join(f"{name}: {amount:g}" for name, amount in sorted(node_types.items())) or "none"
        raise UserError(f"resources.{setting}={per_trial:g} but the largest node has {largest:g} {resource}s "
                        f"(alive nodes: {', '.join(f'{a:g}' for a in alive_nodes) or 'none'}; node types: {types}); "
                        f"lower {setting} or add a node type with more {resource}s")


def node_type_resources(resource: str, path: str = BOOTSTRAP_CONFIG) -> dict[str, float | None]:
    """``resource`` ("CPU" or "GPU") per node type of the autoscaler config that `ray up` left on
    this (head) node, if any. A type without a GPU entry has none; one without a CPU entry gets
    None (Ray detects its CPUs when it starts)."""
    file = Path(path).expanduser()
    if not file.is_file():
        return {}
    types = (yaml.safe_load(file.read_text()) or {}).get("available_node_types") or {}
    default = 0 if resource == "GPU" else None
    amounts = {name: (spec.get("resources") or {}).get(resource, default) for name, spec in types.items()}
    return {name: None if amount is None else float(amount) for name, amount in amounts.items()}


def alive_node_resources(resource: str) -> list[float]:
    """``resource`` ("CPU" or "GPU") of each node alive in the connected Ray cluster (``ray.nodes()``)."""
    import ray

    return [float(node["Resources"].get(resource, 0)) for node in ray.nodes() if node["Alive"]]


class DiskError(UserError):
    """A disk the sweep must write (storage, the MLflow store, a node's working folder) is full,
    read-only or forbidden: one line naming the path and the reason."""


# ---------------------------------------------------------------------------------------------
# The trainable (runs on a worker node)
# ---------------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def working_folder(trial: str) -> Path:
    """A new, empty node-local folder for one attempt of trial ``trial`` (its trial id):
    ``<RAY_TMPDIR or the system's temporary folder>/itl_ray_work/<trial>-<pid>``. It lies outside
    Tune's trial directory, which Tune's syncer copies to storage in the background while the trial
    renames and deletes files in it. Folders of earlier attempts of the same trial on this node
    whose process is gone (a killed worker) are removed first."""
    base = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / WORK_FOLDERS
    base.mkdir(parents=True, exist_ok=True)
    for earlier in base.glob(f"{trial}-*"):
        pid = earlier.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(earlier, ignore_errors=True)
    folder = base / f"{trial}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def restore_folder(workdir: Path, checkpoint) -> None:
    """Make ``workdir`` exactly the checkpoint's folder (empty without one): the checkpoint, not
    whatever an earlier attempt left on this node, is the trial's state."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    if checkpoint is not None:
        checkpoint.to_directory(str(workdir))


def _trainable(params: dict) -> None:
    """The Ray Tune function trainable: runs one trial and reports through ``tune.report``."""
    import ray
    import torch
    from ray import tune

    from itl_ray.trial import run_trial

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no "Checkpoint successfully created" per report
    quiet_lost_sigterm()  # Ray's SIGTERM during garbage collection: no traceback on the console

    params = params["trial"]
    config = from_dict(TrialConfig, params["config"])
    if not config.runtime.threads:
        torch.set_num_threads(max(1, int(params["cpus"])))

    def log(line: str) -> None:
        print(f"[{params['name']}] {line}", flush=True)

    # A retry gets Tune's latest checkpoint of this trial; a resumed sweep the one MLflow names.
    checkpoint = tune.get_checkpoint()
    if checkpoint is None and params.get("resume_from"):
        checkpoint = tune.Checkpoint(params["resume_from"])

    def report(kind: str, payload: dict, step: int | None) -> None:
        with open(workdir / REPORT_LOG, "a") as handle:
            handle.write(json.dumps({"kind": kind, "step": step, "payload": payload}) + "\n")
        # The copy to storage is made inside tune.report, in this thread: the folder holds still.
        folder = tune.Checkpoint.from_directory(str(workdir)) if kind in CHECKPOINTED else None
        try:
            tune.report({"itl_kind": kind, "itl_step": step if step is not None else -1, "itl_payload": payload},
                        checkpoint=folder)
        except OSError as error:
            if error.filename is None:  # pyarrow names no file: it was copying the folder to storage
                error.filename = params["storage"]
            raise

    workdir = None
    try:
        workdir = working_folder(params["trial_id"])
        restore_folder(workdir, checkpoint)
        where = f"from checkpoint {checkpoint.path}" if checkpoint is not None else "from scratch"
        log(f"on node {ray.get_runtime_context().get_node_id()}, starting {where}")
        run_trial(config, workdir, report, log)
    except OSError as error:
        if disk_error(error) is None:
            raise
        # The driver stops the sweep with this one line (no retry can write a full disk).
        tune.report({"itl_kind": "disk_error", "itl_step": -1, "itl_payload": {
            "error": describe_disk_error(disk_error(error), f"the working folder {workdir}")}})
        raise
    finally:
        if workdir is not None:  # all of it is in the last checkpoint; free this node's disk
            shutil.rmtree(workdir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The driver side: MLflow
# ---------------------------------------------------------------------------------------------

def checkpoint_uri(checkpoint) -> str:
    """Where a Tune checkpoint lies, as a path or URI that ``tune.Checkpoint(...)`` reads back."""
    scheme = checkpoint.filesystem.type_name
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def read_report_log(checkpoint) -> list[dict]:
    """The trial's reports kept in a checkpoint (none when the checkpoint has no log)."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{REPORT_LOG}") as stream:
            text = stream.read().decode()
    except (FileNotFoundError, OSError):
        return []
    reports = []
    for line in text.splitlines():
        try:
            reports.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash; its checkpoint came later or never
            continue
    return reports


def trial_folder_name(name: str, tid: str) -> str:
    """Tune's folder for a trial: its short name and id, e.g.
    ``num_classes=10,images_per_class=40-3d41f04249ae`` (characters other than letters, digits
    and ``=,._-`` become ``_``; at most 100 characters of the name)."""
    return f"{re.sub(r'[^A-Za-z0-9=,._-]', '_', name)[:100]}-{tid}"


def log_trial_record(tracker, run_id: str, checkpoint) -> None:
    """Upload a trial's record (``trial.RECORD_FILES`` and the ``per_image`` folder) from its
    checkpoint to its run; only those files are copied from a remote (s3://, gs://) checkpoint."""
    import pyarrow.fs

    from itl_ray.trial import PER_IMAGE, RECORD_FILES

    if checkpoint.filesystem.type_name == "local":
        tracker.log_trial_files(run_id, checkpoint.path, RECORD_FILES, (PER_IMAGE,))
        return
    with tempfile.TemporaryDirectory() as folder:
        for name in (*RECORD_FILES, PER_IMAGE):
            source = f"{checkpoint.path}/{name}"
            if checkpoint.filesystem.get_file_info(source).type != pyarrow.fs.FileType.NotFound:
                pyarrow.fs.copy_files(source, f"{folder}/{name}", source_filesystem=checkpoint.filesystem)
        tracker.log_trial_files(run_id, folder, RECORD_FILES, (PER_IMAGE,))


def _progress_callback(progress: SweepProgress):
    from ray.tune import Callback

    class Progress(Callback):
        """Feeds Tune's trial events to the sweep's progress line."""

        def on_trial_start(self, iteration, trials, trial, **info):
            progress.start(trial.config["trial"]["trial_id"])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            progress.reported()

        def on_trial_complete(self, iteration, trials, trial, **info):
            progress.end(trial.config["trial"]["trial_id"])

        def on_trial_error(self, iteration, trials, trial, **info):
            progress.end(trial.config["trial"]["trial_id"], failed=True)

    return Progress()


class StopSweep(BaseException):
    """Carries a reason to stop (``reason``, e.g. a DiskError) out of Tune's loop, past its
    ``except Exception`` clean-up, to ``run_sweep``."""

    def __init__(self, reason: BaseException):
        super().__init__(reason)
        self.reason = reason


class StopSignals:
    """SIGINT and SIGTERM while the sweep runs: the first is noted and raised as ``Interrupted`` by
    ``check`` (the driver loop calls it at each step, every tenth of a second); a second one raises
    at once, wherever the driver is. Also the one place a stop for another reason (a disk that
    cannot be written) waits to be raised. Installed after ``ray.init`` (it replaces the handlers
    Ray's driver installs, which end the process with a native stack dump on SIGTERM) and with
    Tune's own SIGINT handler disabled (``TUNE_DISABLE_SIGINT_HANDLER``); restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self.stop: BaseException | None = None  # raised at the next check
        self._previous: dict = {}
        self._tune_handler = None

    def __enter__(self) -> "StopSignals":
        self._tune_handler = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        if self._tune_handler is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._tune_handler

    def _handle(self, number: int, frame) -> None:
        if self.received is not None:
            raise Interrupted(number)
        self.received = number
        self.stop = Interrupted(number)

    def check(self) -> None:
        """Raise the stop that is waiting, if any."""
        if self.stop is not None:
            raise self.stop


def _mlflow_callback(tracker, parent_run_id: str, signals: StopSignals | None = None):
    from ray.tune import Callback

    class MlflowTrials(Callback):
        """Writes each trial's params and metrics to its one MLflow run, and tags the run with the
        trial's latest checkpoint (before Tune deletes the one before it). At each step of the
        driver loop it raises a waiting stop (a signal, a trial's disk error)."""

        def __init__(self):
            self.runs: dict[str, str] = {}
            self.recorded: set[str] = set()  # trial ids whose record went to their run

        def on_step_begin(self, iteration, trials, **info):
            if signals is not None:
                signals.check()

        def run_of(self, trial_config: dict) -> str:
            tid, name = trial_config["trial_id"], trial_config["name"]
            if tid not in self.runs:
                self.runs[tid] = tracker.trial_run(tid, name, parent_run_id, tags=trial_tags(trial_config))
                tracker.log_params(self.runs[tid], {"experiment": ",".join(trial_config.get("experiments", []))})
            return self.runs[tid]

        def on_trial_start(self, iteration, trials, trial, **info):
            self.run_of(trial.config["trial"])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            kind = result.get("itl_kind")
            if kind == "disk_error" and signals is not None and signals.stop is None:
                name = trial.config["trial"]["name"]
                signals.stop = StopSweep(DiskError(f"trial {name} cannot write {result['itl_payload']['error']}; "
                                                   "nothing finished is lost: free space or make it writable, "
                                                   "then run again with --resume"))
            if kind in ("params", "curve", *CHECKPOINTED):
                step = int(result["itl_step"]) if kind in STEPPED else None
                tracker.record(self.run_of(trial.config["trial"]), kind, result.get("itl_payload") or {}, step)

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            tracker.set_checkpoint(self.run_of(trial.config["trial"]), checkpoint_uri(checkpoint))

        def on_trial_complete(self, iteration, trials, trial, **info):
            run_id = self.run_of(trial.config["trial"])
            tracker.finish(run_id)  # the run ends when its trial does
            if trial.checkpoint is not None:
                log_trial_record(tracker, run_id, trial.checkpoint)
                self.recorded.add(trial.config["trial"]["trial_id"])

        def on_trial_error(self, iteration, trials, trial, **info):
            tracker.finish(self.run_of(trial.config["trial"]), failed=True)

    return MlflowTrials()


def trial_labels(planned: PlannedTrial, keys: list[str]) -> dict:
    """What the report groups a trial by: its experiments and its point (the config without the
    seed: its name and an id)."""
    return {"experiments": list(planned.experiments), "point": point_name(planned.config, keys),
            "point_id": trial_id(dataclasses.replace(planned.config, seed=0))}


def trial_tags(trial: dict) -> dict[str, str]:
    """The MLflow tags of a trial's run that name its experiments and point."""
    from itl_ray.tracking import EXPERIMENTS, POINT, POINT_ID

    if "experiments" not in trial:
        return {}
    return {EXPERIMENTS: ",".join(trial["experiments"]), POINT: trial["point"], POINT_ID: trial["point_id"]}


def results_table(rows: list[dict]) -> str:
    """A text table: one row per trial, the four headline metrics in percent, and the induction
    metrics when a trial has them (missing: ``missing``)."""
    columns = [*FINAL_METRICS, *(metric for metric in INDUCTION_METRICS if any(metric in row for row in rows))]
    frame = pd.DataFrame([{"trial": row["name"], **{metric: row.get(metric) for metric in columns}}
                          for row in rows], columns=["trial", *columns])
    return tables.to_text(frame)


def stop_sweep(tracker, parent: str | None, started_ray: bool, killed: bool) -> int:
    """After an interrupted or failed ``fit``: mark the sweep's runs still RUNNING as KILLED (a
    signal) or FAILED, as far as the MLflow store can still be written, and shut down the Ray
    instance this driver started (its trials stop with it; on a cluster they stop when this
    driver disconnects). Returns how many trial runs were stopped."""
    import ray

    stopped = 0
    if parent is not None:
        try:
            runs = tracker.running_runs(parent)
            for run_id in runs:
                tracker.finish(run_id, failed=not killed, killed=killed)
            stopped = len(runs) - (parent in runs)
        except Exception:  # noqa: BLE001 - the store itself may be what failed; the checkpoints keep all
            pass
    if started_ray:
        ray.shutdown()
    return stopped


def run_sweep(spec: SweepSpec, resume: bool = False, log=say) -> list[dict]:
    """Run every trial of the sweep through Ray Tune; returns one row per trial with its metrics.

    Before Ray starts: every trial's inputs, the storage folder (written to, when local) and the
    MLflow store (reachable, writable, the experiment not deleted; a resume finds its sweep) are
    checked. Raises ``Interrupted`` after SIGINT/SIGTERM and ``DiskError`` when a disk cannot be
    written, both after the sweep's runs are marked and Ray is stopped (``stop_sweep``)."""
    quiet_ray()
    import ray
    from ray import tune

    from itl_ray.tracking import Tracker
    from itl_ray.trial import read_inputs

    for config in spec.trials():  # bad data paths or settings fail here, before Ray starts
        read_inputs(config)
    storage = storage_root(spec.storage)
    if "://" not in storage:
        check_writable(storage, "the storage folder (setting storage)")
    # Fails fast on an unreachable server or unwritable store; a resume reads only, and creates
    # nothing, until it has found its sweep.
    tracker = Tracker(spec.trial.name, create=not resume)
    sid = sweep_id(spec)
    if resume:
        tracker.resumable_sweep(sid, spec.trial.name)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(include_dashboard=False, logging_level="ERROR")  # RAY_ADDRESS or `ray start` here: that cluster
    parent = None
    with StopSignals() as signals:
        try:
            check_fits("CPU", spec.resources.cpus_per_trial, alive_node_resources("CPU"), node_type_resources("CPU"))
            check_fits("GPU", spec.resources.gpus_per_trial, alive_node_resources("GPU"), node_type_resources("GPU"))
            parent = tracker.sweep_run(sid, spec.trial.name, resume)
            return _fit(spec, tracker, parent, resume, storage, signals, log)
        except StopSweep as stop:  # a trial's disk error, raised from inside Tune's loop
            stop_sweep(tracker, parent, started_ray, killed=False)
            raise stop.reason from None
        except Interrupted as interrupted:
            stopped = stop_sweep(tracker, parent, started_ray, killed=True)
            interrupted.detail = f"{stopped} running trial(s) stopped, their MLflow runs marked KILLED"
            raise
        except Exception as error:
            message = disk_cause(error, storage, tracker.uri)
            if message is None:
                raise
            stop_sweep(tracker, parent, started_ray, killed=False)
            raise DiskError(f"{message}; nothing finished is lost: free space or make it writable, then "
                            "run again with --resume") from None


def disk_cause(error: BaseException, storage: str, uri: str) -> str | None:
    """What a disk has to do with ``error``, the driver's failure, as "cannot write PATH: REASON";
    None when nothing points to a disk. A disk error or the MLflow store's write error anywhere in
    the chain of causes names it; else the storage folder and the store are probed again, since a
    full disk also surfaces as follow-on errors that name no file (a truncated state file read
    back)."""
    from itl_ray.tracking import check_writable_store, store_error

    failed = disk_error(error)
    if failed is not None:
        return f"cannot write {describe_disk_error(failed, storage)}"
    message = store_error(error, uri)
    if message is not None:
        return message
    try:
        if "://" not in storage:
            check_writable(storage, "the storage folder")
        check_writable_store(uri)
    except UserError as probe:
        return str(probe).split("; ")[0]
    return None


def _fit(spec: SweepSpec, tracker, parent: str, resume: bool, storage: str, signals: StopSignals, log) -> list[dict]:
    """The Tuner's run and the rows of its results (``run_sweep`` has checked everything)."""
    from ray import tune

    sid = sweep_id(spec)
    tracker.log_params(parent, {"sweep_id": sid, "trials": len(spec.trials()),
                                "experiments": ",".join(spec.experiment_names()), "seeds": spec.seeds,
                                **{f"grid.{key}": values for key, values in spec.grid.items()}})
    tracker.describe(parent, spec.description)
    checkpoints = tracker.trial_checkpoints(parent) if resume else {}
    keys = varying_keys(spec)
    trials = [
        {"config": to_dict(planned.config), "trial_id": trial_id(planned.config),
         "name": trial_name(planned.config, keys), "cpus": spec.resources.cpus_per_trial,
         "resume_from": checkpoints.get(trial_id(planned.config)), "storage": storage, **trial_labels(planned, keys)}
        for planned, _ in ordered_plan(spec)
    ]
    tracker.log_plan(parent, [{key: trial[key] for key in ("trial_id", "name", "experiments", "point", "point_id")}
                              | {"seed": trial["config"]["seed"]} for trial in trials])
    resumed = sum(trial["resume_from"] is not None for trial in trials)
    log(f"sweep {spec.trial.name!r}: {len(trials)} trials ({resumed} from checkpoints); MLflow {tracker.uri}, "
        f"parent run {parent}")
    callback = _mlflow_callback(tracker, parent, signals)
    progress = SweepProgress(spec.trial.name, len(trials), log)
    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}),
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=spec.max_concurrent_trials or None,
            trial_dirname_creator=lambda trial: trial_folder_name(trial.config["trial"]["name"],
                                                                 trial.config["trial"]["trial_id"]),
        ),
        run_config=tune.RunConfig(
            name=f"{spec.trial.name}-{parent[:8]}-{time.strftime('%Y%m%d-%H%M%S')}",  # one per driver run
            storage_path=storage,
            callbacks=[callback, _progress_callback(progress)],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )
    grid = tuner.fit()
    signals.check()  # a signal that came as the last trial ended
    rows, failed = [], False
    for result in grid:
        trial = (result.config or {}).get("trial", {})
        row = {"name": trial.get("name", "?"), "trial_id": trial.get("trial_id")}
        metrics = result.metrics or {}
        final = dict(metrics.get("itl_payload") or {}) if metrics.get("itl_kind") == "final" else {}
        row.update(final)
        if result.error is not None or not final:
            failed = True
            row["error"] = str(result.error).strip().splitlines()[-1] if result.error else "no final metrics"
        rows.append(row)
        # Whatever the live callback missed (a driver killed between a report and its MLflow
        # write), the trial's report log in its latest checkpoint still holds.
        latest = result.checkpoint or (tune.Checkpoint(trial["resume_from"]) if trial.get("resume_from") else None)
        if trial.get("trial_id") and latest is not None:
            run_id = callback.run_of(trial)
            for report in read_report_log(latest):
                tracker.record(run_id, report["kind"], report["payload"] or {}, report["step"])
            if trial["trial_id"] not in callback.recorded:
                log_trial_record(tracker, run_id, latest)
            tracker.finish(run_id, failed="error" in row)
    order = {trial["trial_id"]: index for index, trial in enumerate(trials)}
    rows.sort(key=lambda row: order.get(row["trial_id"], len(order)))
    tracker.finish(parent, failed=failed)
    return rows
