"""``itl-ray bench``: the project's input pipeline + AlexNet training against the default torchvision
pipeline + the same training, on the same generated images, in one run.

1. Images: ``images`` JPEGs at ImageNet's usual sizes (mostly 500x375, quality 90, about 100 KB),
   generated deterministically (a lit colour field, shapes, grain and sensor noise), written as an
   ImageNet folder (``train/<wnid>/*.JPEG`` and ``val/<wnid>/``) that ImageFolder reads directly.
2. Shards: the same folder prepared by ``itl_ray.prepare`` as a trial's data is, with the shorter
   side stored at ``short_side`` (default 256/227 of the resolution: 253 at 224 px, 72 at 64 px).
3. Timing, each after warm-up steps that are not counted, the same model, batch and resolution:
   - baseline: torchvision ImageFolder + PIL + RandomResizedCrop + flip + ToTensor + Normalize in a
     DataLoader (workers = cores, shuffled, pinned memory on CUDA), the training step in eager mode;
   - project: ``fast_loader.FastLoader`` decoding every epoch (the in-memory cache is off) with the same
     augmentation (random_resized_crop), feeding ``pretrain.TrainStep`` (bf16 autocast, channels_last
     and torch.compile on CUDA, as pretraining uses it); one run per (short side, CPU decode share);
   - the project's loader alone, and the model alone on one batch already on the device (the
     ceiling any pipeline can reach).
4. Prints each figure, then one JSON line (the last line): ``project_img_s``, ``baseline_img_s``,
   ``ratio`` and the settings (and ``peak_gpu_mem_gib`` on CUDA).

It imports torch, torchvision, pyarrow, numpy, Pillow and itl_ray's own stage modules only (no Ray,
MLflow, nltk or YAML), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from itl_ray.errors import UserError

SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (400, 500), (500, 500))  # (width, height)
SIZE_WEIGHTS = (0.55, 0.15, 0.1, 0.08, 0.07, 0.05)  # most ImageNet photos are 500x375 or 375x500


@dataclass(frozen=True)
class BenchSettings:
    """``itl-ray bench``'s options (one field per command-line flag); ``validate`` raises UserError
    naming the flag of a bad value."""

    device: str = "cpu"  # cpu or cuda
    images: int = 1000  # generated training images (plus one validation image per class)
    classes: int = 100
    batch_size: int = 64
    resolution: int = 64  # px, square crops
    width: float = 0.25  # AlexNet channel multiplier (model "itl")
    model: str = "itl"  # itl: the study's AlexNet (models.AlexNet); torchvision: torchvision.models.alexnet
    seconds: float = 12.0  # timed per measurement, after warm-up
    warmup: int = 3  # steps not timed (plus torch.compile's)
    # Baseline DataLoader processes and project decode threads; 0: all cores for the baseline,
    # fast_loader.default_workers for the project.
    workers: int = 0
    prefetch: int = 4
    short_sides: tuple[int, ...] = ()  # stored shorter side of the project's shards; empty: 256/227 of the resolution
    cpu_decode_shares: tuple[float, ...] = (0.5,)  # CUDA: fraction of each batch decoded by CPU threads
    compile: str = "auto"  # project's training step: auto (on CUDA), on, off
    max_seconds: float = 0.0  # skip the project runs that would end after this many seconds of the bench; 0: none
    seed: int = 0
    work: str = ""  # folder for images and shards (kept); empty: a temporary folder, removed after

    @staticmethod
    def defaults(device: str) -> "BenchSettings":
        """CPU: a quarter-width AlexNet at 64 px (the demo's), so a 2-core run takes a minute or two.
        CUDA: the full AlexNet at 224 px, batch 512 (the GPU target; ../shared/reference/ANCHORS.md)."""
        if device == "cuda":
            return BenchSettings(device="cuda", images=10000, batch_size=512, resolution=224, width=1.0,
                                 seconds=10.0, warmup=15, cpu_decode_shares=(0.0, 0.5))
        return BenchSettings()

    def validate(self) -> None:
        """Raise UserError naming the flag (``--images`` ...) of a value the bench cannot run with."""
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda, but torch sees no GPU here; use --device cpu")
        if self.model not in ("itl", "torchvision"):
            raise UserError(f"--model must be itl or torchvision, got {self.model!r}")
        if self.images < self.classes or self.classes < 1:
            raise UserError(f"--images ({self.images}) must be at least --classes ({self.classes}), which is >= 1")
        if self.batch_size < 1 or self.images < self.batch_size:
            raise UserError(f"--batch-size must be between 1 and --images ({self.images}), got {self.batch_size}")
        if self.resolution < 32:
            raise UserError(f"--resolution must be at least 32 px, got {self.resolution}")
        if any(side < 1 for side in self.short_sides):
            raise UserError(f"--short-side values must be positive, got {list(self.short_sides)}")
        if any(not 0 <= share <= 1 for share in self.cpu_decode_shares):
            raise UserError(f"--cpu-share values must be between 0 and 1, got {list(self.cpu_decode_shares)}")
        if self.compile not in ("auto", "on", "off"):
            raise UserError(f"--compile must be auto, on or off, got {self.compile!r}")
        if self.seconds <= 0 or self.warmup < 1 or self.max_seconds < 0:
            raise UserError("--seconds must be > 0, --warmup >= 1 and --max-seconds >= 0")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def photo(seed: int, index: int) -> bytes:
    """One deterministic photo-like JPEG at an ImageNet size (about 100 KB at 500x375)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    width, height = SIZES[rng.choice(len(SIZES), p=SIZE_WEIGHTS)]
    canvas = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.uniform(-0.2, 0.9, 2) * (width, height)
        w, h = rng.uniform(0.15, 0.6, 2) * (width, height)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    pixels = np.asarray(canvas, dtype=np.float32)
    grain = rng.standard_normal((height // 8 + 2, width // 8 + 2), dtype=np.float32)
    pixels += 16 * np.asarray(Image.fromarray(grain).resize((width, height), Image.BICUBIC))[..., None]
    pixels += 20 * rng.standard_normal(pixels.shape, dtype=np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def _write_photo(job: tuple[str, int, int]) -> int:
    path, seed, index = job
    data = photo(seed, index)
    Path(path).write_bytes(data)
    return len(data)


def write_image_folder(root: Path, images: int, classes: int, seed: int, workers: int) -> dict:
    """``root/train/<wnid>/*.JPEG`` (``images`` in all) and one ``root/val/<wnid>/`` image per class."""
    wnids = [f"n{number:08d}" for number in range(classes)]
    jobs = []
    for index in range(images):
        wnid = wnids[index % classes]
        jobs.append((str(root / "train" / wnid / f"{wnid}_{index}.JPEG"), seed, index))
    for number, wnid in enumerate(wnids):
        jobs.append((str(root / "val" / wnid / f"{wnid}_val.JPEG"), seed, images + number))
    for wnid in wnids:
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        (root / "val" / wnid).mkdir(parents=True, exist_ok=True)
    if workers > 1:
        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with context.Pool(workers) as pool:
            sizes = pool.map(_write_photo, jobs, chunksize=16)
    else:
        sizes = [_write_photo(job) for job in jobs]
    return {"images": images, "classes": classes, "mean_kb": sum(sizes[:images]) / images / 1024}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(batches: Callable[[], object], step: Callable[[torch.Tensor, torch.Tensor], object],
            device: torch.device, warmup: int, seconds: float) -> float:
    """Images per second of ``step`` over batches from ``batches()`` (called again at each epoch's
    end), timed for ``seconds`` after ``warmup`` steps."""
    steps, counted, started = 0, 0, None
    while True:
        for images, labels in batches():
            step(images, labels)
            steps += 1
            if steps == warmup:
                _synchronize(device)
                started = time.perf_counter()
            elif started is not None:
                counted += len(labels)
                if time.perf_counter() - started >= seconds:
                    _synchronize(device)
                    return counted / (time.perf_counter() - started)


def build_model(settings: BenchSettings, device: torch.device) -> torch.nn.Module:
    """The benchmarked network, seeded: the study's AlexNet (``models.AlexNet`` at the settings'
    width and resolution) or torchvision's, on ``device`` (channels_last on CUDA)."""
    torch.manual_seed(settings.seed)
    if settings.model == "torchvision":
        from torchvision.models import alexnet

        model = alexnet(num_classes=settings.classes)
    else:
        from itl_ray.models import AlexNet

        model = AlexNet(settings.classes, width=settings.width, resolution=settings.resolution)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def make_step(model: torch.nn.Module, device: torch.device, compile: bool, log: Callable[[str], None]):
    """Pretraining's ``TrainStep`` for ``model``: SGD (lr 0.01, momentum 0.9, weight decay 5e-4),
    bf16 autocast on CUDA, torch.compile when ``compile``."""
    from itl_ray.pretrain import TrainStep

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return TrainStep(model, optimizer, device, torch.bfloat16 if device.type == "cuda" else None, compile, log)


def baseline_loader(root: Path, settings: BenchSettings, device: torch.device, workers: int):
    """The default pipeline: torchvision ImageFolder + PIL + transforms + DataLoader."""
    from torchvision import datasets, transforms

    from itl_ray.images import MEAN, STD

    transform = transforms.Compose([
        transforms.RandomResizedCrop(settings.resolution), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(MEAN.flatten().tolist(), STD.flatten().tolist()),
    ])
    dataset = datasets.ImageFolder(str(root / "train"), transform)
    return torch.utils.data.DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, num_workers=workers,
                                       pin_memory=device.type == "cuda", drop_last=True,
                                       persistent_workers=workers > 0)


def _device_batches(loader, device: torch.device):
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, labels.to(device, non_blocking=True)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _gib(value: int) -> float:
    return round(value / 2**30, 2)


def run_bench(settings: BenchSettings, log: Callable[[str], None] = print) -> dict:
    """Generate, prepare, time; returns the figures (what the JSON line holds)."""
    from itl_ray.fast_loader import FastLoader, default_workers
    from itl_ray.image_rows import ImageRows
    from itl_ray.images import short_side_for
    from itl_ray.prepare import PrepareSettings, prepare
    from itl_ray.pretrain import threads_beside
    from itl_ray.shards import Prepared

    settings.validate()
    begun = time.perf_counter()
    device = torch.device(settings.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as pretraining runs, for both pipelines
    cores = _cores()
    workers = settings.workers or cores
    threads = settings.workers or default_workers(device)
    compile_project = settings.compile == "on" or (settings.compile == "auto" and device.type == "cuda")
    short_sides = settings.short_sides or (short_side_for(settings.resolution),)
    shares = settings.cpu_decode_shares if device.type == "cuda" else (1.0,)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cores}-core CPU"
    model_text = ("torchvision AlexNet" if settings.model == "torchvision"
                  else f"AlexNet (the study's) width {settings.width:g}")
    log(f"bench: {name}, torch {torch.__version__}; {model_text} at {settings.resolution} px, batch "
        f"{settings.batch_size}, {'bf16 + channels_last' if device.type == 'cuda' else 'fp32'}")

    work = Path(settings.work) if settings.work else Path(tempfile.mkdtemp(prefix="itl-bench-"))
    try:
        root = work / "images"
        started = time.perf_counter()
        wanted = {"images": settings.images, "classes": settings.classes, "seed": settings.seed}
        done = json.loads((root / "DONE").read_text()) if (root / "DONE").is_file() else {}
        if {key: done.get(key) for key in wanted} != wanted:  # new, or other images: make them (and shards) anew
            for old in [root, *work.glob("shards-*")]:
                shutil.rmtree(old, ignore_errors=True)
            info = write_image_folder(root, settings.images, settings.classes, settings.seed, cores)
            (root / "DONE").write_text(json.dumps({**info, **wanted}))
        info = json.loads((root / "DONE").read_text())
        log(f"bench: {settings.images} training images in {settings.classes} classes (mostly 500x375 JPEG, "
            f"{info['mean_kb']:.0f} KB average) in {time.perf_counter() - started:.1f} s")
        shard_sets = {}
        for side in short_sides:
            started = time.perf_counter()
            folder = work / f"shards-{side}"
            prepare("imagenet", str(root), folder, PrepareSettings(short_side=side), workers=cores)
            data = Prepared(folder, "imagenet")
            shard_sets[side] = data
            log(f"bench: shards at {side} px shorter side in {time.perf_counter() - started:.1f} s")

        # The model alone, its batch already on the device: the ceiling.
        model = build_model(settings, device)
        step = make_step(model, device, compile_project, log)
        fixed = (torch.randn(settings.batch_size, 3, settings.resolution, settings.resolution, device=device),
                 torch.randint(0, settings.classes, (settings.batch_size,), device=device))
        if device.type == "cuda":
            fixed = (fixed[0].contiguous(memory_format=torch.channels_last), fixed[1])
        model_only = measure(lambda: [fixed] * 50, step, device, settings.warmup, min(5.0, settings.seconds))
        log(f"model alone (data already on {device.type}{', compiled' if step.compiled else ''}): "
            f"{model_only:,.0f} img/s")

        # The default torchvision pipeline.
        baseline_model = build_model(settings, device)
        baseline_step = make_step(baseline_model, device, False, log)
        batches = baseline_loader(root, settings, device, workers)
        baseline = measure(lambda: _device_batches(batches, device), baseline_step, device, settings.warmup,
                           settings.seconds)
        if getattr(batches, "_iterator", None) is not None:  # stop its worker processes now
            batches._iterator._shutdown_workers()
        del baseline_model, baseline_step
        log(f"baseline (torchvision ImageFolder + PIL + RandomResizedCrop, DataLoader with {workers} workers, "
            f"eager): {baseline:,.0f} img/s")

        # The project's pipeline, for each shard size and CPU decode share.
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        variants = []
        loader_only = None
        for side, data in shard_sets.items():
            rows = data.rows_in("train")
            labels = {wnid: index for index, wnid in enumerate(sorted(set(data.column("label"))))}
            label_column = data.column("label")
            # Long epochs (few pipeline restarts) of whole batches (one compiled shape).
            repeat = max(1, math.ceil(20 * settings.batch_size / len(rows)))
            count = len(rows) * repeat // settings.batch_size * settings.batch_size
            tiled = np.tile(rows, repeat)[:count]
            images = ImageRows(data, tiled, [labels[label_column[row]] for row in tiled])
            for share in shares:
                if variants and settings.max_seconds and (
                        time.perf_counter() - begun + settings.seconds + 5 > settings.max_seconds):
                    log(f"bench: --max-seconds {settings.max_seconds:g} reached; skipping the remaining project runs")
                    break
                fast = FastLoader(images, settings.resolution, settings.batch_size, device,
                                  augment="random_resized_crop", workers=threads, prefetch=settings.prefetch,
                                  cache_gib=0, cpu_decode_share=share, channels_last=device.type == "cuda", log=log)
                generator = torch.Generator().manual_seed(settings.seed)
                with fast, threads_beside(fast) as training_threads:
                    if loader_only is None:
                        loader_only = measure(lambda: fast.epoch(generator), lambda images, labels: None, device,
                                              settings.warmup, min(5.0, settings.seconds))
                        log(f"project loader alone ({fast.describe()}): {loader_only:,.0f} img/s")
                    rate = measure(lambda: fast.epoch(generator), step, device, settings.warmup, settings.seconds)
                variant = {"short_side": side, "img_s": round(rate, 1)}
                if device.type == "cuda":
                    variant["cpu_decode_share"] = share
                variants.append(variant)
                what = f", {share:.0%} decoded on CPU threads" if device.type == "cuda" else ""
                where = f", training on {training_threads} of {cores} cores" if device.type == "cpu" else ""
                log(f"project (fast pipeline, shards at {side} px{what}, {threads} decode thread"
                    f"{'s' if threads > 1 else ''}{where}"
                    f"{', compiled' if step.compiled else ''}): {rate:,.0f} img/s")
        best = max(variants, key=lambda v: v["img_s"])
        result = {
            "project_img_s": best["img_s"], "baseline_img_s": round(baseline, 1),
            "ratio": round(best["img_s"] / baseline, 2),
            "device": device.type, "device_name": name, "batch_size": settings.batch_size,
            "resolution": settings.resolution, "model": settings.model, "width": settings.width,
            "images": settings.images, "image_kb": round(info["mean_kb"], 1), "augment": "random_resized_crop",
            "short_side": best["short_side"], "workers": workers, "decode_threads": threads,
            "compiled": step.compiled is not None, "model_only_img_s": round(model_only, 1),
            "project_loader_img_s": round(loader_only, 1), "variants": variants,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        }
        if device.type == "cuda":
            result["cpu_decode_share"] = best["cpu_decode_share"]
            result["peak_gpu_mem_gib"] = _gib(torch.cuda.max_memory_allocated(device))
            result["peak_gpu_reserved_gib"] = _gib(torch.cuda.max_memory_reserved(device))
            log(f"peak GPU memory (project runs): {result['peak_gpu_mem_gib']} GiB allocated, "
                f"{result['peak_gpu_reserved_gib']} GiB reserved")
        log(f"ratio: {result['ratio']:.2f}x (project {result['project_img_s']:,.0f} img/s, baseline "
            f"{result['baseline_img_s']:,.0f} img/s)")
        return result
    finally:
        if not settings.work:
            shutil.rmtree(work, ignore_errors=True)
