"""The transfer stages at real VOC 2007 scale: Selective Search proposals (time and recall).

    python benchmarks/bench_transfer.py [--images 48] [--workers N] [--parts proposals] [--keep DIR]

The set is generated (``itl_ray.datasets.synthetic.synthesize_voc2007``): VOC 2007's image size
(500 x 375) with 1 to 6 objects per image whose shorter side runs from 16 px to the whole image,
so every size bin of the recall report is populated. VOC 2007 itself has 5,011 trainval + 4,952
test images; Selective Search over all of them takes hours on a few cores, so ``--images`` takes a
sample of that set (half trainval, half test), reported as a sample, and the full set's time is
extrapolated from the measured CPU time per image.

Parts (``--parts``, comma-separated):
- ``proposals``: ``itl-ray prepare voc2007`` on the sample with ``--workers`` processes (the path a
  user takes), then from its PREPARED.json and report.json: Selective Search CPU seconds per
  image (one core), wall time, boxes per image, recall at IoU 0.5 of the ground-truth boxes overall
  and by shorter side (< 32, 32-64, 64-128, >= 128 px). Target: recall >= 0.95 for objects of
  32 px and more.

Each part is a function ``part(args, folder) -> dict`` in ``PARTS``; a new part (the detection
stage's training speed and memory) adds its function there. The last line is JSON with every
part's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from itl_ray.datasets.synthetic import synthesize_voc2007  # noqa: E402
from itl_ray.prepare import PrepareSettings, prepare  # noqa: E402

VOC2007_IMAGES = 5011 + 4952  # trainval + test
RECALL_TARGET = 0.95  # for objects of 32 px and more


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


PARTS = {"proposals": bench_proposals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48, help="images of the generated set (a sample of 9,963)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
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
