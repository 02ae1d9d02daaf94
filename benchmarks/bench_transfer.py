"""The transfer stages at real VOC scale and on the mini-benchmark.

    python benchmarks/bench_transfer.py detection [--work DIR] [--device cpu|cuda] [--iterations 40]
                                                  [--test-images 20] [--proposals sliding_window]
    python benchmarks/bench_transfer.py mini [--shards data/mini-shards]

Sections (each a function of its own; shared helpers first):

- shared: ``generate_voc2007_sized`` writes a generated VOC 2007 of the real size (5,011 trainval
  + 4,952 test images, most 500 x 375 or 375 x 500 px, photo-like backgrounds, 1-6 objects of the
  20 classes per image whose shorter sides range from 12 to 350 px, the small ones marked
  difficult) in the devkit layout, and ``itl-ray prepare voc2007`` prepares it (both cached in
  ``--work``).
- detection: one PASCAL-DET run with Fast R-CNN's CaffeNet recipe (``DetectionConfig``'s
  defaults: 600 px, 2 images and 128 RoIs per step, the study's full-width AlexNet at 227 px,
  random weights: speed does not depend on them) for ``--iterations`` steps and a test pass over
  ``--test-images`` test images, in a fresh process, so that its peak resident memory
  (``ru_maxrss``) is the stage's alone. Prints training iterations per second (between the first
  and the last curve point, so start-up is not counted), test images per second, the resident
  memory before the stage and at its peak (target: under 4 GB on a CPU), and the full recipe's
  time (40,000 iterations and all 4,952 test images) extrapolated from these rates, marked as an
  extrapolation. ``--proposals sliding_window`` (the default here) times the stage without
  Selective Search boxes; ``selective_search`` needs a prepared folder that holds them.
- mini: the three transfer stages of one trial of ``sweeps/smoke.yaml`` (its settings, one torch
  thread as the demo runs each trial) on the prepared mini-benchmark, on a random-init backbone of
  the smoke sweep's size; prints seconds per stage (target: under 90 s for the three).

The last line of each command is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from itl_ray.datasets.voc import VOC_CLASSES, voc_splits  # noqa: E402
from itl_ray.shards import Prepared  # noqa: E402

VOC2007_TRAINVAL, VOC2007_TEST = 5011, 4952  # images in VOC 2007's trainval and test
RECIPE_ITERATIONS = 40000  # Fast R-CNN's CaffeNet schedule (DetectionConfig().iterations)


# ---------------------------------------------------------------------------------------------
# Shared: a generated VOC 2007 of the real size


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A photo-like background: smooth colour gradients and mild noise (JPEGs of a real photo's size)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    for channel in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        image[..., channel] = 128 + 60 * np.sin(a * x / 40 + b * y / 50 + c * 6)
    image += rng.normal(0, 12, image.shape).astype(np.float32)
    return image.clip(0, 255).astype(np.uint8)


def _voc_image(job: tuple) -> str:
    """Worker: one generated image and its annotation. Returns the image id."""
    from PIL import Image, ImageDraw

    base, index, seed = job
    rng = np.random.default_rng((seed, index))
    width, height = (500, int(rng.choice([375, 333, 281, 500]))) if rng.uniform() < 0.7 else (375, 500)
    image = Image.fromarray(_background(rng, width, height))
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(int(rng.integers(1, 7))):
        name = VOC_CLASSES[int(rng.integers(len(VOC_CLASSES)))]
        short = float(np.exp(rng.uniform(math.log(12), math.log(350))))
        aspect = float(np.exp(rng.uniform(math.log(0.4), math.log(2.5))))
        box_w = int(min(width, max(short, short * aspect)))
        box_h = int(min(height, max(short, short / aspect)))
        left, top = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if VOC_CLASSES.index(name) % 2 else draw.rectangle
        shape((left, top, left + box_w - 1, top + box_h - 1), fill=colour, outline=(0, 0, 0))
        objects.append((name, (left + 1, top + 1, left + box_w, top + box_h), min(box_w, box_h) < 16))
    image_id = f"{index:06d}"
    image.save(Path(base) / "JPEGImages" / f"{image_id}.jpg", quality=90)
    parts = [f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (x0, y0, x1, y1), difficult in objects:
        parts.append(f"<object><name>{name}</name><truncated>0</truncated><difficult>{int(difficult)}</difficult>"
                     f"<bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
                     "</object>")
    (Path(base) / "Annotations" / f"{image_id}.xml").write_text("".join(parts) + "</annotation>\n")
    return image_id


def generate_voc2007_sized(root: Path, trainval: int = VOC2007_TRAINVAL, test: int = VOC2007_TEST, seed: int = 0,
                           workers: int | None = None) -> Path:
    """Write the generated VOC 2007 under ``root/VOCdevkit/VOC2007`` (skipped when a complete one
    with these sizes is there); returns ``root/VOCdevkit``."""
    from concurrent.futures import ProcessPoolExecutor

    devkit = root / "VOCdevkit"
    base = devkit / "VOC2007"
    stamp = root / "GENERATED.json"
    identity = {"trainval": trainval, "test": test, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == identity:
        return devkit
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        ids = list(pool.map(_voc_image, [(str(base), index, seed) for index in range(trainval + test)],
                            chunksize=64))
    (base / "ImageSets/Main/trainval.txt").write_text("\n".join(ids[:trainval]) + "\n")
    (base / "ImageSets/Main/test.txt").write_text("\n".join(ids[trainval:]) + "\n")
    stamp.write_text(json.dumps(identity))
    print(f"generated {trainval + test:,} VOC-2007-sized images in {time.perf_counter() - started:.0f} s", flush=True)
    return devkit


def prepared_voc2007(work: Path, trainval: int, test: int, workers: int | None = None) -> Path:
    """The generated set, prepared as `itl-ray prepare voc2007` prepares it (cached)."""
    from itl_ray.prepare import prepare

    devkit = generate_voc2007_sized(work / f"voc2007-{trainval}-{test}", trainval, test, workers=workers)
    out = work / f"voc2007-{trainval}-{test}-prepared"
    started = time.perf_counter()
    info = prepare("voc2007", str(devkit), out, workers=workers)
    print(f"prepared {info['images']:,} images ({time.perf_counter() - started:.0f} s)", flush=True)
    return out


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, GiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---------------------------------------------------------------------------------------------
# Detection


def detection_run(args) -> dict:
    """One detection stage with the recipe's defaults but ``--iterations`` and ``--test-images``
    (and the smoke mode's smaller network and images); in this process (``detection`` calls it in a
    fresh one, for a clean memory figure)."""
    from itl_ray.models import AlexNet
    from itl_ray.transfer.detection import DetectionConfig, DetectionRuntime, evaluate_detection

    device, iterations, test_images = args.device, args.iterations, args.test_images
    if args.threads:
        torch.set_num_threads(args.threads)
    data = voc_splits(Prepared(args.prepared, "voc2007"), "trainval", "test")
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


def detection(args) -> dict:
    started = time.perf_counter()
    prepared = prepared_voc2007(Path(args.work), args.trainval, args.test, args.workers)
    if args.prepare_only:
        return {"prepared": str(prepared), "seconds": round(time.perf_counter() - started, 1)}
    command = [sys.executable, __file__, "detection-run", "--prepared", str(prepared), "--device", args.device,
               "--iterations", str(args.iterations), "--test-images", str(args.test_images),
               "--proposals", args.proposals, "--threads", str(args.threads), "--width", str(args.width),
               "--resolution", str(args.resolution), "--image-size", str(args.image_size),
               "--max-size", str(args.max_size), "--window-stride", str(args.window_stride)]
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


# ---------------------------------------------------------------------------------------------
# The mini-benchmark


def mini(args) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    det = commands.add_parser("detection", help="detection speed and memory on a generated VOC-2007-sized set")
    det.add_argument("--work", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "itl-bench-transfer"))
    det.add_argument("--trainval", type=int, default=VOC2007_TRAINVAL)
    det.add_argument("--test", type=int, default=VOC2007_TEST)
    det.add_argument("--workers", type=int, default=0, help="processes generating and preparing (0: all cores)")
    det.add_argument("--prepare-only", action="store_true", help="generate and prepare the set, time nothing")
    run = commands.add_parser("detection-run", help=argparse.SUPPRESS)
    run.add_argument("--prepared", required=True)
    for sub in (det, run):
        sub.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
        sub.add_argument("--iterations", type=int, default=40)
        sub.add_argument("--test-images", type=int, default=20)
        sub.add_argument("--proposals", default="sliding_window", choices=("sliding_window", "selective_search"))
        sub.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        sub.add_argument("--width", type=float, default=1.0, help="AlexNet width (1.0: the study's)")
        sub.add_argument("--resolution", type=int, default=227, help="AlexNet's pretraining resolution, px")
        sub.add_argument("--image-size", type=int, default=600, help="shorter image side, px (the recipe: 600)")
        sub.add_argument("--max-size", type=int, default=1000, help="longer side cap, px (the recipe: 1000)")
        sub.add_argument("--window-stride", type=float, default=0.5,
                         help="sliding windows' step (0.2: about 2,000 windows per 500 x 375 image, Selective "
                              "Search's count, for timing)")
    small = commands.add_parser("mini", help="the three transfer stages on the prepared mini-benchmark")
    small.add_argument("--shards", default=str(REPO / "data" / "mini-shards"))
    args = parser.parse_args(argv)
    if args.command == "detection":
        args.workers = args.workers or None
        result = detection(args)
    elif args.command == "detection-run":
        result = detection_run(args)
    else:
        result = mini(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
