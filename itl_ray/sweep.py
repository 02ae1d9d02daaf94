"""A sweep with Ray Tune: one Tune trial per trial config, tracked in MLflow from the driver.

Ray is an adapter here: the trainable calls ``trial.run_trial`` and forwards its reports with
``tune.report``; a Tune callback on the driver writes them to MLflow (one writer, one run per
trial, found again by its trial id on a retry or resume). ``Tuner``, ``TuneConfig`` and
``RunConfig`` are built in ``run_sweep``, in one place.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from itl_ray.config import SweepSpec, TrialConfig, from_dict, to_dict, trial_id, trial_name
from itl_ray.trial import FINAL_METRICS

# Rough cost model for --dry-run: GPU-seconds per pretraining image of the full AlexNet at 227 px
# with a fast input pipeline (25k img/s on one H100), and GPU-hours of the three transfer
# fine-tunings of one trial (orders of magnitude, not promises).
SECONDS_PER_IMAGE_EPOCH = 1 / 25000
TRANSFER_GPU_HOURS = 1.5


def varying_keys(spec: SweepSpec) -> list[str]:
    keys = list(spec.grid)
    for extra in spec.extra_trials:
        keys += [key for key in extra if key not in keys]
    return keys


def sweep_id(spec: SweepSpec) -> str:
    text = json.dumps([to_dict(t) for t in spec.trials()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def estimated_images(config: TrialConfig, classes_in_data: int = 1000) -> int:
    classes = config.pretrain.num_classes or classes_in_data
    return classes * config.pretrain.images_per_class * config.pretrain.epochs


def ordered_trials(spec: SweepSpec) -> list[TrialConfig]:
    """Longest trials first, so the slowest one does not start last."""
    return sorted(spec.trials(), key=estimated_images, reverse=True)


def dry_run(spec: SweepSpec) -> str:
    keys = varying_keys(spec)
    lines = [f"{len(spec.trials())} trials in sweep {spec.trial.name!r}:"]
    total = 0.0
    for index, config in enumerate(ordered_trials(spec)):
        hours = estimated_images(config) * SECONDS_PER_IMAGE_EPOCH / 3600 + TRANSFER_GPU_HOURS
        total += hours
        lines.append(f"  [{index}] {trial_id(config)}  {trial_name(config, keys)}  ~{hours:.1f} GPU-h")
    lines.append(f"estimate: ~{total:.1f} GPU-hours at full-size AlexNet speed ({1 / SECONDS_PER_IMAGE_EPOCH:,.0f} "
                 f"img/s) plus ~{TRANSFER_GPU_HOURS} GPU-h of transfer fine-tuning per trial "
                 "(1000 classes where num_classes is null)")
    return "\n".join(lines)


def _trainable(params: dict) -> None:
    """The Ray Tune function trainable: runs one trial and reports through ``tune.report``."""
    import torch
    from ray import tune

    from itl_ray.trial import run_trial

    params = params["trial"]
    config = from_dict(TrialConfig, params["config"])
    if not config.threads:
        torch.set_num_threads(max(1, int(params["cpus"])))

    def report(kind: str, payload: dict, step: int | None) -> None:
        tune.report({"itl_kind": kind, "itl_step": step if step is not None else -1, "itl_payload": payload})

    def log(line: str) -> None:
        print(f"[{params['name']}] {line}", flush=True)

    run_trial(config, Path(params["workdir"]), report, log)


def _mlflow_callback(tracker, parent_run_id: str):
    from ray.tune import Callback

    class MlflowTrials(Callback):
        """Writes each trial's params and metrics to its one MLflow run."""

        def __init__(self):
            self.runs: dict[str, str] = {}

        def _run(self, trial) -> str:
            tid, name = trial.config["trial"]["trial_id"], trial.config["trial"]["name"]
            if tid not in self.runs:
                self.runs[tid] = tracker.trial_run(tid, name, parent_run_id)
            return self.runs[tid]

        def on_trial_start(self, iteration, trials, trial, **info):
            self._run(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            kind = result.get("itl_kind")
            if kind in ("params", "epoch", "final"):
                step = int(result["itl_step"]) if kind == "epoch" else None
                tracker.record(self._run(trial), kind, result.get("itl_payload") or {}, step)

        def on_trial_complete(self, iteration, trials, trial, **info):
            tracker.finish(self._run(trial))

        def on_trial_error(self, iteration, trials, trial, **info):
            tracker.finish(self._run(trial), failed=True)

    return MlflowTrials()


def results_table(rows: list[dict]) -> str:
    """A text table: one row per trial, the four headline metrics in percent."""
    header = ["trial", *FINAL_METRICS]
    body = [[row["name"], *(f"{row[m]:.1f}" if isinstance(row.get(m), float) else "-" for m in FINAL_METRICS)]
            for row in rows]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def run_sweep(spec: SweepSpec, resume: bool = False, log=print) -> list[dict]:
    """Run every trial of the sweep through Ray Tune; returns one row per trial with its metrics."""
    import ray
    from ray import tune

    from itl_ray.tracking import Tracker

    from itl_ray.trial import read_inputs

    for config in spec.trials():  # bad data paths or settings fail here, before Ray starts
        read_inputs(config)
    tracker = Tracker(spec.trial.name)  # fails fast on an unreachable server, before any trial
    sid = sweep_id(spec)
    parent = tracker.sweep_run(sid, spec.trial.name, resume)
    tracker.log_params(parent, {"sweep_id": sid, "trials": len(spec.trials()),
                                **{f"grid.{key}": values for key, values in spec.grid.items()}})
    storage = Path(spec.storage).expanduser().resolve()
    keys = varying_keys(spec)
    trials = [
        {"config": to_dict(config), "trial_id": trial_id(config), "name": trial_name(config, keys),
         "workdir": str(storage / "trials" / parent / trial_id(config)), "cpus": spec.resources.cpus_per_trial}
        for config in ordered_trials(spec)
    ]
    log(f"sweep {spec.trial.name!r}: {len(trials)} trials; MLflow {tracker.uri}, parent run {parent}")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="ERROR")
    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": spec.resources.cpus_per_trial, "gpu": spec.resources.gpus_per_trial}),
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=spec.max_concurrent_trials or None),
        run_config=tune.RunConfig(
            name=f"{spec.trial.name}-{parent[:8]}",
            storage_path=str(storage / "ray"),
            callbacks=[_mlflow_callback(tracker, parent)],
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            verbose=0,
        ),
    )
    grid = tuner.fit()
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
    order = {trial["trial_id"]: index for index, trial in enumerate(trials)}
    rows.sort(key=lambda row: order.get(row["trial_id"], len(order)))
    tracker.finish(parent, failed=failed)
    return rows
