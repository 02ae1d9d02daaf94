"""Benchmark: `itl-ray report` over a generated MLflow store of 100 trial runs (target: under 10 s).

    python benchmarks/bench_report.py [--runs 100] [--resamples 1000] [--keep DIR] [--no-per-image]

Writes a sqlite store the way a sweep does (``Tracker``: one parent run, one run per trial with its
experiment tags, params, final metrics and per-image scores as artifacts), for the points of
``sweeps/paper.yaml`` with as many seeds as make up ``--runs``; the per-image scores are the
mini-benchmark's sizes (250 VOC 2007 test images, 200 VOC 2012 action images, 480 SUN397 test
images). Then it times the report on it, in this process (after imports) and as the command a user
runs (a fresh process, imports included), and, for scale, the bootstrap of one trial at the real
test sets' sizes (VOC 2007: 4,952 images, up to 100 detections each; SUN397: 19,850 images).
Prints the figures; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from itl_ray.datasets.voc import ACTION_CLASSES, VOC_CLASSES  # noqa: E402

# The points of sweeps/paper.yaml: (experiments, label_set, num_classes, source_classes, images_per_class)
POINTS = [
    (("images_per_class", "number_of_classes", "split", "pascal_removed", "induction"), "fine", 1000, 1000, 1300),
    (("images_per_class",), "fine", 1000, 1000, 500),
    (("images_per_class", "fixed_budget"), "fine", 1000, 1000, 250),
    (("images_per_class", "fixed_budget"), "fine", 1000, 1000, 125),
    (("images_per_class",), "fine", 1000, 1000, 50),
    (("number_of_classes",), "down_up_918", 918, 1000, 1300),
    (("number_of_classes",), "down_up_753", 753, 1000, 1300),
    (("number_of_classes",), "down_up_486", 486, 1000, 1300),
    (("number_of_classes", "induction"), "down_up_79", 79, 1000, 1300),
    (("number_of_classes", "induction"), "down_up_9", 9, 1000, 1300),
    (("number_of_classes", "induction"), "up_down_127", 127, 1000, 1300),
    (("fixed_budget",), "fine", 500, 500, 500),
    (("fixed_budget",), "fine", 250, 250, 1000),
    (("fixed_budget",), "fine", 500, 500, 250),
    (("fixed_budget",), "fine", 250, 250, 500),
    (("fixed_budget",), "fine", 125, 125, 1000),
    (("split",), "random_a", 500, 500, 1300),
    (("split",), "random_b", 500, 500, 1300),
    (("split",), "minimal_a", 500, 500, 1300),
    (("split",), "minimal_b", 500, 500, 1300),
    (("pascal_removed",), "pascal_removed", 771, 771, 1300),
    (("images_per_class", "number_of_classes", "fixed_budget", "split", "pascal_removed", "induction"), "fine", 1000,
     1000, 0),
]
EXPERIMENTS = ["images_per_class", "number_of_classes", "fixed_budget", "split", "pascal_removed", "induction"]


def per_image_scores(quality: float, rng: np.random.Generator, folder: Path, sizes: dict) -> None:
    """Per-image Parquet files of a trial whose scores separate positives by about ``quality``."""
    folder.mkdir(parents=True, exist_ok=True)
    detections, positives = [], []
    for index in range(sizes["voc07"]):
        image = f"{index:06d}"
        counts = rng.poisson(0.12, len(VOC_CLASSES))
        for name, count in zip(VOC_CLASSES, counts):
            positives.append((image, name, int(count)))
            for _ in range(count):
                if rng.random() < 0.4 + 0.5 * quality:
                    detections.append((image, name, float(rng.beta(2 + 4 * quality, 2)), True, False))
        for _ in range(sizes["detections_per_image"]):
            detections.append((image, VOC_CLASSES[rng.integers(20)], float(rng.beta(2, 3)), False, True))
    pd.DataFrame(detections, columns=["image_id", "class", "score", "tp", "fp"]).to_parquet(
        folder / "voc07_det_detections.parquet", index=False)
    pd.DataFrame(positives, columns=["image_id", "class", "positives"]).to_parquet(
        folder / "voc07_det_positives.parquet", index=False)
    rows = []
    for index in range(sizes["voc12"]):
        for action in ACTION_CLASSES:
            label = int(rng.random() < 0.15)
            rows.append((f"{index:06d}", 0, action, float(rng.normal(label * 2 * quality, 1)), label))
    pd.DataFrame(rows, columns=["image_id", "person", "action", "score", "label"]).to_parquet(
        folder / "voc12_act_scores.parquet", index=False)
    scenes = [f"/s/scene_{i:03d}" for i in range(sizes["scenes"])]
    label = rng.choice(scenes, sizes["sun397"])
    prediction = np.where(rng.random(sizes["sun397"]) < 0.2 + 0.5 * quality, label, rng.choice(scenes, sizes["sun397"]))
    pd.DataFrame({"image_id": [f"{i:06d}" for i in range(sizes["sun397"])], "label": label,
                  "prediction": prediction}).to_parquet(folder / "sun397_predictions.parquet", index=False)


MINI = {"voc07": 250, "detections_per_image": 30, "voc12": 200, "sun397": 480, "scenes": 24}
REAL = {"voc07": 4952, "detections_per_image": 100, "voc12": 3144, "sun397": 19850, "scenes": 397}


def generate_store(folder: Path, runs: int, name: str = "paper", seed: int = 0, per_image: bool = True) -> str:
    """A sqlite store with one sweep of ``runs`` trial runs over POINTS (seeds 0, 1, ... until
    ``runs``), as ``itl-ray sweep`` leaves it. Returns the tracking URI."""
    from itl_ray.tracking import EXPERIMENTS as EXPERIMENT_TAG, POINT, POINT_ID, Tracker

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracker = Tracker(name, uri)
    parent = tracker.sweep_run("generated", name, resume=False)
    tracker.log_params(parent, {"experiments": ",".join(EXPERIMENTS)})
    rng = np.random.default_rng(seed)
    plan = []
    seeds = -(-runs // len(POINTS))
    made = 0
    for trial_seed in range(seeds):
        for index, (experiments, label_set, classes, source, per_class) in enumerate(POINTS):
            if made == runs:
                break
            point = f"label_set={label_set},num_classes={source},images_per_class={per_class}"
            trial_id = f"t{index:02d}s{trial_seed}"
            plan.append({"trial_id": trial_id, "name": f"{point},seed={trial_seed}", "experiments": list(experiments),
                         "point": point, "point_id": f"p{index:02d}", "seed": trial_seed})
            run = tracker.trial_run(trial_id, plan[-1]["name"], parent, tags={
                EXPERIMENT_TAG: ",".join(experiments), POINT: point, POINT_ID: f"p{index:02d}"})
            quality = 0.0 if per_class == 0 else 0.5 + 0.1 * np.log10(source * per_class / 1000)
            tracker.log_params(run, {"label_set": label_set, "num_classes": classes, "source_classes": source,
                                     "images_per_class": per_class, "pretrain_images": source * per_class,
                                     "seed": trial_seed, "experiment": ",".join(experiments)})
            metrics = {"pretrain_top1": 40 + 20 * quality + rng.normal(0, 0.5),
                       "voc07_det_map": 30 + 30 * quality + rng.normal(0, 0.6),
                       "voc12_act_map": 25 + 25 * quality + rng.normal(0, 0.8),
                       "sun397_acc": 20 + 30 * quality + rng.normal(0, 0.5)}
            tracker.log_metrics(run, metrics)
            if per_image:
                with tempfile.TemporaryDirectory() as scratch:
                    per_image_scores(quality, rng, Path(scratch) / "per_image", MINI)
                    tracker.client.log_artifacts(run, str(Path(scratch) / "per_image"), "per_image")
            tracker.finish(run)
            made += 1
    tracker.log_plan(parent, plan)
    tracker.finish(parent)
    return uri


def real_size_bootstrap(resamples: int) -> dict:
    """Seconds to resample one trial's three metrics at the real test sets' sizes."""
    from itl_ray import bootstrap
    from itl_ray.per_image import load_task

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as scratch:
        per_image_scores(0.6, rng, Path(scratch), REAL)
        seconds = {}
        for metric in ("voc07_det_map", "voc12_act_map", "sun397_acc"):
            task = load_task(metric, scratch)
            started = time.perf_counter()
            bootstrap.resampled_metric(task.metric, len(task.images), resamples)
            seconds[metric] = round(time.perf_counter() - started, 2)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--keep", default=None, help="write the store and the report here and keep them")
    parser.add_argument("--skip-real-size", action="store_true")
    parser.add_argument("--no-per-image", action="store_true",
                        help="trial runs without per-image scores (as the transfer stages leave them today)")
    args = parser.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="itl-bench-report-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    uri = generate_store(folder, args.runs, per_image=not args.no_per_image)
    print(f"generated {args.runs} trial runs {'without' if args.no_per_image else 'with'} per-image scores in "
          f"{time.perf_counter() - started:.1f} s: {uri}")
    os.environ["MLFLOW_TRACKING_URI"] = uri

    from itl_ray.report import report

    started = time.perf_counter()
    report("paper", folder / "report-in-process", resamples=args.resamples, log=lambda line: None)
    in_process = time.perf_counter() - started
    print(f"report, in this process (imports done): {in_process:.2f} s")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "itl_ray.cli", "report", "--experiment", "paper", "--out",
                           str(folder / "report"), "--resamples", str(args.resamples)],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    command = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:])
        return 1
    print(f"`itl-ray report` as a command (fresh process, imports included): {command:.2f} s (target < 10 s)")
    print(f"report: {folder / 'report' / 'report.html'}")
    result = {"runs": args.runs, "per_image": not args.no_per_image, "resamples": args.resamples,
              "cores": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2),
              "report_in_process_s": round(in_process, 2),
              "report_command_s": round(command, 2)}
    if not args.skip_real_size:
        result["real_size_bootstrap_s_per_trial"] = real_size_bootstrap(args.resamples)
        print(f"bootstrap of one trial at the real test sets' sizes ({args.resamples} resamples), seconds: "
              f"{result['real_size_bootstrap_s_per_trial']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
