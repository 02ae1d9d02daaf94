"""The transfer stages at real VOC 2007 scale: Selective Search proposals, the detection stage's
speed and memory, and the three transfer stages on the mini-benchmark.

    python benchmarks/bench_transfer.py [--parts proposals,detection,mini] [--images 48] [--workers N]
        [--keep DIR] [--trainval 5011 --test 4952] [--prepare-only] [--device cpu|cuda]
        [--iterations 40] [--test-images 20] [--proposals sliding_window] [--shards data/mini-shards]

The sets are generated (``itl_ray.datasets.synthetic.synthesize_voc2007``): VOC 2007's image size
(500 x 375) with 1 to 6 objects per image whose shorter side runs from 16 px to the whole image,
so every size bin of the recall report is populated. VOC 2007 itself has 5,011 trainval + 4,952
test images.

Parts (``--parts``, comma-separated; default ``proposals``), each a function
``part(args, folder) -> dict`` in ``PARTS``:
- ``proposals``: Selective Search over all of VOC 2007 takes hours on a few cores, so ``--images``
  takes a sample of the set (half trainval, half test), reported as a sample, and the full set's
  time is extrapolated from the measured CPU time per image. ``itl-ray prepare voc2007`` runs on the
  sample with ``--workers`` processes (the path a user takes), then from its PREPARED.json and
  report.json: Selective Search CPU seconds per image (one core), wall time, boxes per image,
  recall at IoU 0.5 of the ground-truth boxes overall and by shorter side (< 32, 32-64, 64-128,
  >= 128 px). Target: recall >= 0.95 for objects of 32 px and more.
- ``detection``: a set of ``--trainval`` + ``--test`` images (the real size by default), prepared
  as ``itl-ray prepare voc2007`` prepares it (with ``--proposals selective_search``, Selective
  Search included: that is prepare's cost, hours on a few cores for the full size; with sliding
  windows, as ``itl-ray prepare voc2007 --no-proposals``; ``--prepare-only`` stops there), then one PASCAL-DET run
  with Fast R-CNN's CaffeNet recipe (``DetectionConfig``'s defaults: 600 px, 2 images and 128
  RoIs per step, the study's full-width AlexNet at 227 px, random weights: speed does not depend
  on them) for ``--iterations`` steps and a test pass over ``--test-images`` test images, in a
  fresh process, so that its peak resident memory (``ru_maxrss``) is the stage's alone. Prints
  training iterations per second (between the first and the last curve point, so start-up is not
  counted), test images per second, the resident memory before the stage and at its peak (target:
  under 4 GB on a CPU), and the full recipe's time (40,000 iterations and all 4,952 test images)
  extrapolated from these rates, marked as an extrapolation. ``--proposals sliding_window`` (the
  default here) times the stage with dense windows (``--window-stride 0.18``: about 2,000 per
  image, Selective Search's count); ``selective_search`` uses the stored proposals.
- ``mini``: the three transfer stages of one trial of ``sweeps/smoke.yaml`` (its settings, one
  torch thread as the demo runs each trial) on the prepared mini-benchmark (``--shards``), on a
  random-init backbone of the smoke sweep's size; prints seconds per stage (target: under 90 s for
  the three).

The work folder is ``--keep`` (kept, and the generated and prepared sets in it reused) or a
temporary one. The last line is JSON with every part's figures, keyed by part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from itl_ray.datasets.synthetic import synthesize_voc2007  # noqa: E402
from itl_ray.datasets.voc import voc_splits  # noqa: E402
from itl_ray.prepare import PrepareSettings, prepare  # noqa: E402
from itl_ray.shards import Prepared  # noqa: E402

VOC2007_TRAINVAL, VOC2007_TEST = 5011, 4952  # images in VOC 2007's trainval and test
VOC2007_IMAGES = VOC2007_TRAINVAL + VOC2007_TEST
RECALL_TARGET = 0.95  # for objects of 32 px and more
RECIPE_ITERATIONS = 40000  # Fast R-CNN's CaffeNet schedule (DetectionConfig().iterations)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------------------------------------
# Proposals


def generated_set(args, folder: Path) -> Path:
    """The sample of the VOC-2007-sized set (generated once per folder); returns its VOCdevkit."""
    trainval = (args.images + 1) // 2
    started = time.perf_counter()
    root = synthesize_voc2007(folder / "voc2007", trainval=trainval, test=args.images - trainval, seed=0,
                              workers=args.workers)
    print(f"generated {args.images} images of 500x375 in {time.perf_counter() - started:.1f} s", flush=True)
    return root / "VOCdevkit"


def bench_proposals(args, folder: Path) -> dict:
    """Selective Search through `itl-ray prepare voc2007`: time per image and recall by size."""
    devkit = generated_set(args, folder)
    out = folder / "prepared"
    started = time.perf_counter()
    info = prepare("voc2007", str(devkit), out, PrepareSettings(short_side=0), workers=args.workers)
    wall = time.perf_counter() - started
    report = json.loads((out / "report.json").read_text())["proposals"]
    timing = info["proposal_timing"]
    per_image = timing["cpu_seconds_per_image"]
    recall = report["recall_iou_0.5"]
    found = sum(recall[name]["found"] for name in ("32-64", "64-128", ">=128"))
    objects = sum(recall[name]["objects"] for name in ("32-64", "64-128", ">=128"))
    large_recall = found / objects if objects else None
    result = {
        "images": args.images, "sample_of": VOC2007_IMAGES, "workers": timing["workers"],
        "selective_search_cpu_s_per_image": per_image, "prepare_wall_s": round(wall, 1),
        "boxes_per_image": report["boxes_per_image"],
        "recall_iou_0.5": {name: value["recall"] for name, value in recall.items()},
        "objects": {name: value["objects"] for name, value in recall.items()},
        "recall_32px_and_more": round(large_recall, 4) if large_recall is not None else None,
        "recall_target_met": large_recall is not None and large_recall >= RECALL_TARGET,
        "full_set_hours_on_these_workers": round(per_image * VOC2007_IMAGES / timing["workers"] / 3600, 2),
        "full_set_hours_on_16_cores": round(per_image * VOC2007_IMAGES / 16 / 3600, 2),
    }
    print(f"Selective Search: {per_image:.2f} CPU s per 500x375 image (one core); {args.images} images (a sample "
          f"of {VOC2007_IMAGES:,}) took {wall:.0f} s wall with {timing['workers']} workers, generation excluded",
          flush=True)
    print(f"boxes per image: mean {report['boxes_per_image']['mean']}, min {report['boxes_per_image']['min']}, "
          f"max {report['boxes_per_image']['max']}", flush=True)
    for name in ("all", "<32", "32-64", "64-128", ">=128"):
        value = recall[name]
        shown = "n/a" if value["recall"] is None else f"{value['recall']:.3f}"
        print(f"recall at IoU 0.5, {name:>6}: {shown} ({value['found']}/{value['objects']} objects)", flush=True)
    verdict = "met" if result["recall_target_met"] else "NOT met"
    print(f"recall for objects >= 32 px: {result['recall_32px_and_more']} (target {RECALL_TARGET}: {verdict})",
          flush=True)
    print(f"the full VOC 2007 ({VOC2007_IMAGES:,} images) would take about "
          f"{result['full_set_hours_on_these_workers']} h with {timing['workers']} workers here, "
          f"{result['full_set_hours_on_16_cores']} h on 16 such cores", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# Detection


def prepared_voc2007(args, folder: Path) -> Path:
    """The detection part's set (``--trainval`` + ``--test`` images), generated and prepared as
    `itl-ray prepare voc2007` prepares it, both reused from ``folder`` when already there."""
    started = time.perf_counter()
    root = synthesize_voc2007(folder / f"voc2007-{args.trainval}-{args.test}", trainval=args.trainval,
                              test=args.test, seed=0, workers=args.workers)
    print(f"generated {args.trainval + args.test:,} images ({time.perf_counter() - started:.0f} s)", flush=True)
    out = folder / f"voc2007-{args.trainval}-{args.test}-prepared"
    started = time.perf_counter()
    with_proposals = args.proposals == "selective_search"  # else sliding windows: no Selective Search needed
    info = prepare("voc2007", str(root / "VOCdevkit"), out, workers=args.workers, proposals=with_proposals)
    print(f"prepared {info['images']:,} images ({time.perf_counter() - started:.0f} s)", flush=True)
    return out


RUN_OPTIONS = ("device", "iterations", "test_images", "proposals", "threads", "width", "resolution", "image_size",
               "max_size", "window_stride")  # passed on to the fresh process of the detection run


def bench_detection(args, folder: Path) -> dict:
    """The detection stage's speed and memory (see the module docstring)."""
    started = time.perf_counter()
    prepared = prepared_voc2007(args, folder)
    if args.prepare_only:
        return {"prepared": str(prepared), "seconds": round(time.perf_counter() - started, 1)}
    command = [sys.executable, __file__, "--detection-run", str(prepared)]
    for name in RUN_OPTIONS:
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"the detection run failed (exit {done.returncode})")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"detection on {result['device']} ({result['threads']} threads), {result['trainval_images']:,} trainval "
          f"images: {result['train_it_s']} it/s, test {result['test_images_s']} images/s, resident memory "
          f"{result['rss_before_stage_gib']} GiB before the stage, peak {result['peak_rss_gib']} GiB "
          f"(target < 4 GB); full recipe extrapolated: {result['extrapolated_full_recipe']['total_minutes']} min",
          flush=True)
    return result


def detection_run(args) -> dict:
    """One detection stage with the recipe's defaults but ``--iterations`` and ``--test-images``
    (and the smoke mode's smaller network and images); in this process (``detection`` calls it in a
    fresh one, for a clean memory figure)."""
    from itl_ray.models import AlexNet
    from itl_ray.transfer.detection import DetectionConfig, DetectionRuntime, evaluate_detection

    device, iterations, test_images = args.device, args.iterations, args.test_images
    if args.threads:
        torch.set_num_threads(args.threads)
    data = voc_splits(Prepared(args.detection_run, "voc2007"), "trainval", "test")
    data = replace(data, test=replace(data.test, images=data.test.images[:test_images],
                                      rows=data.test.rows[:test_images]))
    torch.manual_seed(0)
    backbone = AlexNet(1000, width=args.width, resolution=args.resolution)
    config = DetectionConfig(iterations=iterations, lr_step=max(1, round(0.75 * iterations)), proposals=args.proposals,
                             image_size=args.image_size, max_size=args.max_size, window_stride=args.window_stride)
    proposals = args.proposals if args.proposals != "sliding_window" else (
        f"sliding_window (stride {args.window_stride}; a stand-in for timing, not the recipe's Selective Search)")
    before = peak_rss_gib()
    marks, lines = [], []

    def curve(metrics, step):
        if device == "cuda":
            torch.cuda.synchronize()
        marks.append((step, time.perf_counter()))

    def log(line):
        lines.append((time.perf_counter(), line))
        print(line, flush=True)

    started = time.perf_counter()
    output = evaluate_detection(backbone, data, config, torch.device(device), seed=0, log=log, curve=curve)
    total = time.perf_counter() - started
    (first_step, first_time), (last_step, last_time) = marks[0], marks[-1]
    train_rate = (last_step - first_step) / (last_time - first_time) if last_step > first_step else float("nan")
    test_seconds = started + total - last_time  # from the last training step to the end: test and scoring
    test_rate = test_images / test_seconds
    result = {
        "device": device, "device_name": (torch.cuda.get_device_name() if device == "cuda"
                                         else f"{platform.machine()} CPU, {os.cpu_count()} cores"),
        "threads": torch.get_num_threads(), "proposals": proposals, "trainval_images": len(data.train),
        "network": f"AlexNet width {args.width} at {args.resolution} px, images {args.image_size}/{args.max_size} px",
        "iterations": iterations, "train_it_s": round(train_rate, 3), "test_images": test_images,
        "test_images_s": round(test_rate, 3), "test_batch_size": DetectionRuntime().test_batch_size,
        "stage_seconds": round(total, 1),
        "rss_before_stage_gib": round(before, 3), "peak_rss_gib": round(peak_rss_gib(), 3),
        "map_note": "random backbone, short schedule: the mAP is not a result",
        "voc07_det_map": round(output.metrics["voc07_det_map"], 2),
    }
    train_full, test_full = RECIPE_ITERATIONS / train_rate, VOC2007_TEST / test_rate
    result["extrapolated_full_recipe"] = {
        "note": f"extrapolated from {iterations} iterations and {test_images} test images",
        "train_minutes": round(train_full / 60, 1), "test_minutes": round(test_full / 60, 1),
        "total_minutes": round((train_full + test_full) / 60, 1)}
    if device == "cuda":
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


# ---------------------------------------------------------------------------------------------
# The mini-benchmark


def bench_mini(args, folder: Path) -> dict:
    """The three transfer stages of a smoke-sweep trial on the prepared mini-benchmark."""
    from itl_ray.config import load_spec
    from itl_ray.datasets.sun397 import scene_data
    from itl_ray.models import AlexNet
    from itl_ray.shards import prepared_paths
    from itl_ray.transfer.action import evaluate_action
    from itl_ray.transfer.detection import evaluate_detection
    from itl_ray.transfer.scene import evaluate_scene

    torch.set_num_threads(1)
    paths = prepared_paths(args.shards)
    config = load_spec(REPO / "sweeps" / "smoke.yaml", {f"data.{key}": value for key, value in paths.items()}).trial
    torch.manual_seed(0)
    backbone = AlexNet(40, width=config.model.width, resolution=config.model.resolution)
    device = torch.device("cpu")
    quiet = lambda line: None  # noqa: E731
    stages = {
        "detection": lambda: evaluate_detection(backbone, voc_splits(Prepared(paths["voc2007"], "voc2007"), "trainval",
                                                                     "test"), config.transfer.detection, device, 0,
                                                log=quiet),
        "action": lambda: evaluate_action(backbone, voc_splits(Prepared(paths["voc2012"], "voc2012-action"), "train",
                                                               "val"), config.transfer.action, device, 0, log=quiet),
        "scene": lambda: evaluate_scene(backbone, scene_data(Prepared(paths["sun397"], "sun397"), 1),
                                        config.transfer.scene, device, 0, log=quiet),
    }
    seconds = {}
    for name, run in stages.items():
        started = time.perf_counter()
        run()
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"mini-benchmark {name}: {seconds[name]} s", flush=True)
    total = round(sum(seconds.values()), 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"mini-benchmark, three transfer stages: {total} s (target < 90 s; load average {load:.1f} on "
          f"{os.cpu_count()} cores)", flush=True)
    return {"mini_transfer_seconds": total, "per_stage_seconds": seconds, "load_average": load}


PARTS = {"proposals": bench_proposals, "detection": bench_detection, "mini": bench_mini}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="proposals", help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="processes generating and preparing (default: all cores)")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    proposals = parser.add_argument_group("proposals")
    proposals.add_argument("--images", type=int, default=48, help="images of the generated set (a sample of 9,963)")
    detection = parser.add_argument_group("detection")
    detection.add_argument("--trainval", type=int, default=VOC2007_TRAINVAL)
    detection.add_argument("--test", type=int, default=VOC2007_TEST)
    detection.add_argument("--prepare-only", action="store_true", help="generate and prepare the set, time nothing")
    detection.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    detection.add_argument("--iterations", type=int, default=40)
    detection.add_argument("--test-images", type=int, default=20)
    detection.add_argument("--proposals", default="sliding_window", choices=("sliding_window", "selective_search"))
    detection.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    detection.add_argument("--width", type=float, default=1.0, help="AlexNet width (1.0: the study's)")
    detection.add_argument("--resolution", type=int, default=227, help="AlexNet's pretraining resolution, px")
    detection.add_argument("--image-size", type=int, default=600, help="shorter image side, px (the recipe: 600)")
    detection.add_argument("--max-size", type=int, default=1000, help="longer side cap, px (the recipe: 1000)")
    detection.add_argument("--window-stride", type=float, default=0.5,
                           help="sliding windows' step (0.18: about 2,000 windows per 500 x 375 image, Selective "
                                "Search's count, for timing)")
    detection.add_argument("--detection-run", default=None, help=argparse.SUPPRESS)  # the fresh process
    mini_options = parser.add_argument_group("mini")
    mini_options.add_argument("--shards", default=str(REPO / "data" / "mini-shards"))
    args = parser.parse_args(argv)
    if args.detection_run:
        print(json.dumps(detection_run(args)))
        return
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown or args.images < 2:
        parser.error(f"unknown part {unknown[0]!r}" if unknown else "--images must be at least 2")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d')}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as temporary:
        folder = Path(args.keep) if args.keep else Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        for part in parts:
            results[part] = PARTS[part](args, folder)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
