"""Preparing datasets, and reading training crops from the shards against torchvision's ImageFolder.

    python benchmarks/bench_prepare.py [--images 1200] [--batch-size 128] [--workers N]

1. Prepare: generates the mini-benchmark (``itl-ray synth``) in a temporary folder, then times
   ``itl-ray prepare`` of its four datasets with all cores (goal: under 60 s in all).
2. Read: writes ``--images`` photo-like JPEGs at ImageNet's usual 500x375 into an ImageNet layout,
   prepares them (shorter side 256), then measures, in this one run and on these same images,
   training batches of 224 px crops with flips:
   - project: manifest rows read from the memory-mapped shards, decoded, cropped, flipped and
     normalised by ``itl_ray.fast_loader.FastLoader`` (the pipeline pretraining uses; decoding every
     epoch, no cache) with ``--workers`` decode threads;
   - baseline: ``torchvision.datasets.ImageFolder`` on the source files, PIL decode,
     RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize, a DataLoader with
     ``--workers`` processes.
   One warm-up pass over the data, then the best of two timed passes for each. Goal: project at
   least 2x the baseline. The last line is JSON.
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

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from itl_ray.datasets.synthetic import dataset_paths, synthesize  # noqa: E402
from itl_ray.prepare import PrepareSettings, prepare  # noqa: E402
from itl_ray.shards import PREPARE_KINDS, Prepared, prepared_paths  # noqa: E402


def time_prepare_mini(folder: Path, workers: int) -> dict:
    started = time.perf_counter()
    synthesize(folder / "mini", seed=0)
    synth_seconds = time.perf_counter() - started
    raw, out = dataset_paths(folder / "mini"), prepared_paths(folder / "shards")
    seconds = {}
    for setting, kind in PREPARE_KINDS.items():
        started = time.perf_counter()
        info = prepare(kind, raw[setting], out[setting], workers=workers)
        seconds[kind] = round(time.perf_counter() - started, 2)
        print(f"prepare {kind:15s} {info['images']:6,} images  {seconds[kind]:6.2f} s", flush=True)
    total = round(sum(seconds.values()), 2)
    print(f"prepare, all four: {total:.1f} s (synth before it: {synth_seconds:.1f} s)", flush=True)
    return {"prepare_mini_s": total, "prepare_mini_per_kind_s": seconds}


def photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> np.ndarray:
    """A photo-like image: smooth colour gradients, a few blobs and mild noise (so JPEG sizes are
    close to real photos', about 60-120 KB at quality 90)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for channel in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        image[..., channel] = 128 + 60 * np.sin(a * x / 40 + b * y / 50 + c * 6)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
        image[mask] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 12, image.shape)
    return image.clip(0, 255).astype(np.uint8)


def write_imagenet_like(root: Path, images: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    classes = [f"n{index:08d}" for index in range(10)]
    for index in range(images):
        wnid = classes[index % len(classes)]
        for split in ("train",) + (("val",) if index < len(classes) else ()):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo(rng)).save(folder / f"{wnid}_{index}.JPEG", quality=90)


def timed_passes(make_loader, passes: int = 2) -> tuple[float, int]:
    """Images per second of the best of ``passes`` full passes, after one warm-up pass."""
    best, count = 0.0, 0
    for attempt in range(passes + 1):
        loader = make_loader()
        started, count = time.perf_counter(), 0
        for batch in loader:
            images = batch[0]
            assert images.shape[-2:] == (224, 224)
            count += len(images)
        rate = count / (time.perf_counter() - started)
        if attempt:
            best = max(best, rate)
    return best, count


def read_benchmark(folder: Path, images: int, batch_size: int, workers: int) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from itl_ray.fast_loader import FastLoader
    from itl_ray.image_rows import ImageRows
    from itl_ray.images import MEAN, STD

    root = folder / "photos"
    started = time.perf_counter()
    write_imagenet_like(root, images)
    print(f"wrote {images} JPEGs of 500x375 in {time.perf_counter() - started:.1f} s", flush=True)
    info = prepare("imagenet", str(root), folder / "photos-prepared", PrepareSettings(short_side=256), workers=workers)
    data = Prepared(folder / "photos-prepared", "imagenet")
    rows = data.rows_in("train")

    labels = data.column("label")
    classes = sorted(set(labels))
    images = ImageRows(data, rows, [classes.index(labels[row]) for row in rows])
    fast = FastLoader(images, resolution=224, batch_size=batch_size, device=torch.device("cpu"),
                      workers=workers, cache_gib=0.0, log=lambda line: None)
    generator = torch.Generator().manual_seed(0)

    def project():
        return fast.epoch(generator)

    augment = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                  transforms.ToTensor(),
                                  transforms.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist())])
    image_folder = datasets.ImageFolder(str(root / "train"), transform=augment)

    def baseline():
        return DataLoader(image_folder, batch_size=batch_size, shuffle=True, num_workers=workers)

    project_rate, count = timed_passes(project)
    baseline_rate, _ = timed_passes(baseline)
    print(f"project  (shards, itl_ray.fast_loader):   {project_rate:8.1f} img/s  ({count} images a pass)")
    print(f"baseline (ImageFolder + PIL, torchvision): {baseline_rate:8.1f} img/s")
    print(f"ratio: {project_rate / baseline_rate:.2f}x (goal: at least 2x)")
    return {"read_project_img_s": round(project_rate, 1), "read_baseline_img_s": round(baseline_rate, 1),
            "read_ratio": round(project_rate / baseline_rate, 2), "images": info["images"],
            "batch_size": batch_size, "workers": workers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="itl-bench-") as folder:
        result = time_prepare_mini(Path(folder), args.workers)
        result.update(read_benchmark(Path(folder), args.images, args.batch_size, args.workers))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
