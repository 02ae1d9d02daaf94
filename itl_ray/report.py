"""The study's results table from MLflow: one row per trial of an experiment's latest sweep.

    itl-ray report [--experiment smoke] [--out itl_runs/report]
    python analysis/report.py --experiment smoke            (the same, as a script)

Writes ``results.csv`` and ``results.md`` (trials sorted by pretraining images) and, when
matplotlib is installed, ``transfer.png`` (each transfer metric against the number of
pretraining images). Reads ``MLFLOW_TRACKING_URI`` like the sweep does.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from itl_ray.errors import UserError

# The four headline metrics (as itl_ray.trial.FINAL_METRICS, without importing the stages).
FINAL_METRICS = ("pretrain_top1", "voc07_det_map", "voc12_act_map", "sun397_acc")

COLUMNS = ("run_name", "num_classes", "images_per_class", "label_set", "pretrain_images", *FINAL_METRICS)


def latest_experiment() -> str:
    """The experiment of the most recently started sweep in the tracking store."""
    from mlflow.tracking import MlflowClient

    from itl_ray.tracking import tracking_uri

    uri = tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    sweeps = client.search_runs([e.experiment_id for e in experiments], filter_string="tags.`itl.role` = 'sweep'",
                                order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    if not sweeps:
        raise UserError(f"{uri} holds no sweep; run `itl-ray sweep SPEC` first or set MLFLOW_TRACKING_URI")
    return client.get_experiment(sweeps[0].info.experiment_id).name


def latest_sweep_rows(experiment: str) -> list[dict]:
    from itl_ray.tracking import Tracker

    tracker = Tracker(experiment)
    sweeps = tracker.client.search_runs([tracker.experiment_id], filter_string="tags.`itl.role` = 'sweep'",
                                        order_by=["attributes.start_time DESC"], max_results=1)
    if not sweeps:
        raise UserError(f"experiment {experiment!r} in {tracker.uri} has no sweep run; run `itl-ray sweep` first")
    rows = []
    for run in tracker.trial_runs(sweeps[0].info.run_id):
        params, metrics = run.data.params, run.data.metrics
        row = {"run_name": run.info.run_name}
        for key in ("num_classes", "images_per_class", "label_set", "pretrain_images"):
            row[key] = params.get(key, "")
        for key in FINAL_METRICS:
            row[key] = round(metrics[key], 2) if key in metrics else ""
        rows.append(row)
    return sorted(rows, key=lambda row: -int(row["pretrain_images"] or 0))


def write_report(rows: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row[c]) for c in COLUMNS) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    written = [out / "results.csv", out / "results.md"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for axis, metric in zip(axes, FINAL_METRICS[1:]):
        points = sorted((int(r["pretrain_images"]), r[metric]) for r in rows if r[metric] != "")
        axis.plot([p[0] for p in points], [p[1] for p in points], "o-")
        axis.set_xlabel("pretraining images")
        axis.set_title(metric)
    figure.tight_layout()
    figure.savefig(out / "transfer.png", dpi=100)
    written.append(out / "transfer.png")
    return written


def report(experiment: str | None, out: str) -> list[Path]:
    """Write the report of ``experiment`` (default: the latest sweep's) into ``out``; print the table."""
    import os

    from itl_ray.tracking import DEFAULT_STORE

    if not os.environ.get("MLFLOW_TRACKING_URI") and not Path(DEFAULT_STORE).is_file():
        raise UserError(f"no MLflow store here ({DEFAULT_STORE} does not exist): run the report where the sweep ran, "
                        "or set MLFLOW_TRACKING_URI")
    experiment = experiment or latest_experiment()
    paths = write_report(latest_sweep_rows(experiment), Path(out))
    print(f"experiment {experiment!r}:")
    print((Path(out) / "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=None, help="the sweep's name (default: the latest sweep's)")
    parser.add_argument("--out", default="itl_runs/report")
    args = parser.parse_args(argv)
    try:
        report(args.experiment, args.out)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
