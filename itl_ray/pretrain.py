"""Pretraining AlexNet on an ImageNet subset: plain SGD loop, a checkpoint every epoch, resumable.

Defaults follow the AlexNet recipe of the study's time (the study does not give its schedule, so
it is an assumption here; sources in ``PretrainConfig``): SGD with momentum 0.9, weight decay 5e-4,
batch 256, learning rate 0.01 divided by 10 every 30 epochs, 90 epochs, random crops and flips. The
number of epochs is the same for every subset size (smaller subsets get fewer iterations).

Speed (see itl_ray/fast_loader.py and ``itl-ray bench``): images come from the prepared shards through
the fast input pipeline by default (decoded on the GPU or by CPU threads, crops batched, prefetched
while the previous step trains); on CUDA the step runs under bf16 autocast with channels_last
memory and torch.compile. Resuming is exact on a CPU: the checkpoint holds the model, optimizer,
scheduler, the crop generator, torch's global generator (dropout) and the epoch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from itl_ray.bounds import Ge, Gt, Interval

from itl_ray.crop_plans import Augment
from itl_ray.fast_loader import FastLoader, default_workers
from itl_ray.files import atomic_path
from itl_ray.image_rows import ImageRows
from itl_ray.models import AlexNet
from itl_ray.torchvision_loader import TorchvisionLoader

Switch = Literal["auto", "on", "off"]  # auto: on for CUDA


@dataclass(frozen=True)
class PretrainConfig:
    """The ``pretrain`` section of a trial: which ImageNet images and labels, the SGD schedule, and
    how images reach the model.

    The schedule's defaults are an **assumption** (the study does not give its schedule): the usual
    AlexNet recipe of its time. Caffe's models/bvlc_alexnet/solver.prototxt: SGD, base_lr 0.01,
    momentum 0.9, weight_decay 0.0005, gamma 0.1, 450k iterations of batch 256 (train_val.prototxt),
    about 90 epochs of ILSVRC-2012; the drop every 30 epochs is torchvision's references/
    classification recipe for AlexNet (Caffe drops every 100k iterations, about 20 epochs). Every
    subset trains the same number of epochs, so smaller subsets take fewer iterations. Settings
    that change only speed are in ``PretrainRuntime``. Bounds and choices are declared on the
    fields and checked by ``config.from_dict``."""

    # ImageNet classes drawn (nested, seeded); null: all of them.
    num_classes: Annotated[int, Ge(1)] | None = None
    # Images per class (nested, seeded); 0: no pretraining, random initialisation (the control).
    images_per_class: Annotated[int, Ge(0)] = 1300
    label_set: str = "fine"  # fine, or a WordNet label set that merges classes (see label_sets.py)
    shortfall: Literal["take_all", "error"] = "take_all"  # a class with fewer images: take them all (recorded), or stop
    epochs: Annotated[int, Ge(1)] = 90
    batch_size: Annotated[int, Ge(1)] = 256  # images per SGD step
    lr: Annotated[float, Gt(0)] = 0.01  # at batch_size; divided by 10 every lr_drop_every epochs
    lr_drop_every: Annotated[int, Ge(1)] = 30  # epochs
    momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Ge(0)] = 5e-4
    # Input pipeline: fast (fast_loader.FastLoader: decoded once into a cache, or every epoch by CPU
    # threads or nvJPEG on the GPU, crops batched, prefetched) or torchvision (PIL + transforms in
    # DataLoader processes, the plain way, kept for comparison). Both cut the same windows from the
    # same plan, but PIL's and torch's resampling round differently (pixels agree exactly only
    # where the shards hold the crops' shorter side: tests/test_fast_loader.py), so it is part of
    # what a trial computes, not a runtime setting.
    pipeline: Literal["fast", "torchvision"] = "fast"
    # crop: the study's (Caffe's) random crops of the image resized to 256/224 of the crop and
    # center-squared; random_resized_crop: torchvision's (8-100% of the area, aspect 3/4..4/3).
    # Both flip half the images.
    augment: Augment = "crop"
    # auto: bf16 autocast on CUDA, fp32 on a CPU. bf16 changes the numbers (8 bits of mantissa),
    # so precision is part of what a trial computes, not a runtime setting.
    precision: Literal["auto", "bf16", "fp32"] = "auto"


@dataclass(frozen=True)
class PretrainRuntime:
    """How fast images reach the model (the trial config's ``runtime.pretrain``): none of these
    changes what a seed trains on. The same seed gives the same order, crops and flips with any
    number of workers, prefetch depth or cache (tests/test_fast_loader.py checks identical
    batches); channels_last and compile change the memory layout and the kernels, not the
    arithmetic's meaning (results agree to rounding). So they are not part of ``trial_id``: a sweep
    resumed with other values continues the same trials."""

    # Decode threads (fast) or DataLoader processes (torchvision); 0: automatic (a GPU: all cores
    # but two; a CPU: a quarter of torch's threads, which train on the rest while they decode).
    workers: Annotated[int, Ge(0)] = 0
    prefetch: Annotated[int, Ge(1)] = 4  # batches decoded ahead of the training step
    # fast: a set whose decoded squares fit in this many GiB is decoded once and kept on the
    # training device (the demo's subsets: tens of MiB); larger sets are decoded every epoch; 0: never.
    cache_gib: Annotated[float, Ge(0)] = 2.0
    # fast on a GPU, decoding every epoch: the fraction of each batch decoded by the CPU threads,
    # the rest by nvJPEG on the GPU (whose decoding competes with training for the SMs).
    cpu_decode_share: Annotated[float, Interval(ge=0, le=1)] = 0.5
    channels_last: Switch = "auto"  # NHWC memory for model and batches: auto (on CUDA), on or off
    # torch.compile the training step: auto (on CUDA), on or off; eager again if compiling fails.
    compile: Switch = "auto"


def switched(value: str, device: torch.device) -> bool:
    """An auto/on/off setting: auto means on for CUDA."""
    return device.type == "cuda" if value == "auto" else value == "on"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``precision`` setting: bfloat16 for bf16, and for auto on CUDA; None
    (fp32, no autocast) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def make_loader(images: ImageRows, resolution: int, config: PretrainConfig, runtime: PretrainRuntime,
                device: torch.device, train: bool, log: Callable[[str], None] = print):
    """The loader ``config.pipeline`` names, for training (random crops) or evaluation (center crops)."""
    common = dict(augment=config.augment, train=train, prefetch=runtime.prefetch,
                  channels_last=switched(runtime.channels_last, device), log=log)
    if config.pipeline == "torchvision":
        return TorchvisionLoader(images, resolution, config.batch_size, device,
                                 workers=runtime.workers or default_workers(device), **common)
    return FastLoader(images, resolution, config.batch_size, device, workers=runtime.workers,
                      cache_gib=runtime.cache_gib, cpu_decode_share=runtime.cpu_decode_share, **common)


class TrainStep:
    """One SGD step on a batch (images float Nx3xRxR on ``device``, labels int64 N): cross-entropy,
    backward, optimizer step, under bf16 autocast when ``dtype`` is given, with the model
    torch.compile'd when ``compile``. Returns the loss (a 0-d tensor, detached, on the device: no
    host sync, so the loader and the GPU keep running ahead).

    A compiled step that raises is run again eagerly. If the eager step raises too, the error is
    the model's or the batch's (a shape mismatch, a label out of range, memory) and goes to the
    caller as it is; if it succeeds, the compiler failed (a missing C++ compiler, an unsupported
    op, a failed recompile): a log line names the error and later steps run eagerly. Telling them
    apart by type would not do: dynamo reports a model's own error met while tracing as
    ``torch._dynamo.exc.TorchRuntimeError``, and inductor's compiler failures are RuntimeErrors."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 dtype: torch.dtype | None = None, compile: bool = False, log: Callable[[str], None] = print):
        self.model, self.optimizer, self.device, self.dtype, self.log = model, optimizer, device, dtype, log
        self.compiled = torch.compile(model, dynamic=False) if compile else None

    def autocast(self):
        """bf16 autocast on the step's device when ``dtype`` is set, else nothing."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _step(self, forward, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(forward(images), labels)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self._step(self.model, images, labels)
        try:
            return self._step(self.compiled, images, labels)
        except Exception as error:  # the compiler's failure or the model's? The eager step tells.
            compiled_error = error
        loss = self._step(self.model, images, labels)  # raises the model's own error as it is
        first_line = str(compiled_error).splitlines()[0][:160] if str(compiled_error) else ""
        self.log(f"pretrain: torch.compile failed ({type(compiled_error).__name__}: {first_line}); training eagerly")
        self.compiled = None
        return loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, dtype: torch.dtype | None = None) -> float:
    """Top-1 accuracy (fraction) over (images, labels) batches."""
    model.eval()
    correct, total = None, 0
    for images, labels in batches:
        with torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            hits = (model(images).argmax(1) == labels).sum()
        correct = hits if correct is None else correct + hits
        total += len(labels)
    return 0.0 if correct is None else correct.item() / max(1, total)


def top1(model: AlexNet, val: ImageRows, config: PretrainConfig, device: torch.device,
         runtime: PretrainRuntime = PretrainRuntime()) -> float:
    """Top-1 accuracy (fraction) of ``model`` on center crops of ``val`` at the model's resolution."""
    device = torch.device(device)
    model.to(device)
    with make_loader(val, model.resolution, config, runtime, device, train=False, log=lambda line: None) as batches:
        return evaluate(model, batches.epoch(), autocast_dtype(config.precision, device))


@contextlib.contextmanager
def threads_beside(batches):
    """On a CPU, train with torch's threads minus the loader's decoders while they decode beside the
    step (restored afterwards)."""
    before = torch.get_num_threads()
    if batches.decodes_while_training:
        torch.set_num_threads(max(1, before - batches.workers))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` of ``state`` to ``path`` through ``files.atomic_path`` (its folder is made):
    a kill mid-write leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        torch.save(state, temporary)


def pretrain(
    model: AlexNet,
    train: ImageRows,
    val: ImageRows,
    config: PretrainConfig,
    device: torch.device,
    seed: int,
    checkpoint: Path,
    on_epoch: Callable[[int, dict], None] = lambda epoch, metrics: None,
    log: Callable[[str], None] = print,
    runtime: PretrainRuntime = PretrainRuntime(),
) -> dict:
    """Train ``model`` in place on ``train``; resumes from ``checkpoint`` when it exists. Returns final
    metrics (``pretrain_top1`` in percent on ``val``, the validation images of the trained classes).
    After each epoch ``on_epoch(epoch, curves)`` gets the training curves at step = epoch:
    ``pretrain/loss`` (mean cross-entropy of the epoch's steps), ``pretrain/val_top1`` (percent on
    ``val``) and ``pretrain/lr`` (the epoch's learning rate). ``runtime`` sets how fast images arrive, not which
    (``PretrainRuntime``)."""
    device = torch.device(device)
    channels_last = switched(runtime.channels_last, device)
    dtype = autocast_dtype(config.precision, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_drop_every, gamma=0.1)
    generator = torch.Generator().manual_seed(seed)  # the crops and the order of every epoch
    start_epoch = 1
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        if "torch_rng" in state:  # dropout draws from torch's global generator
            torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        start_epoch = state["epoch"] + 1
        log(f"pretrain: resumed after epoch {state['epoch']}")
    accuracy = None
    with contextlib.ExitStack() as stack:
        if channels_last:  # hand the model back in the usual layout
            stack.callback(model.to, memory_format=torch.contiguous_format)
        train_batches = stack.enter_context(make_loader(train, model.resolution, config, runtime, device, train=True,
                                                        log=log))
        val_batches = stack.enter_context(make_loader(val, model.resolution, config, runtime, device, train=False,
                                                      log=log))
        training_threads = stack.enter_context(threads_beside(train_batches))
        if start_epoch <= config.epochs:
            where = device.type if device.type == "cuda" else f"{training_threads} CPU threads"
            log(f"pretrain: {train_batches.describe()}, batch {config.batch_size}, "
                f"{'bf16' if dtype else 'fp32'}{', channels_last' if channels_last else ''} on {where}")
        compile = switched(runtime.compile, device) and start_epoch <= config.epochs
        step = TrainStep(model, optimizer, device, dtype, compile, log)
        for epoch in range(start_epoch, config.epochs + 1):
            model.train()
            started = time.perf_counter()
            total_loss, steps, seen = torch.zeros((), dtype=torch.float64, device=device), 0, 0
            for images, labels in train_batches.epoch(generator):
                total_loss += step(images, labels)
                steps += 1
                seen += len(labels)
            loss = total_loss.item() / max(1, steps)  # waits for the epoch's last step
            rate = seen / max(1e-9, time.perf_counter() - started)
            lr = optimizer.param_groups[0]["lr"]  # the epoch's rate, before the schedule steps
            scheduler.step()
            accuracy = evaluate(model, val_batches.epoch(), dtype)
            metrics = {"pretrain/loss": loss, "pretrain/val_top1": 100 * accuracy, "pretrain/lr": lr}
            save_atomically(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                 "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                 "epoch": epoch, "config": asdict(config)},
                checkpoint,
            )
            log(f"pretrain: epoch {epoch}/{config.epochs} loss {loss:.3f} val top-1 {100 * accuracy:.1f}% "
                f"({rate:,.0f} img/s)")
            on_epoch(epoch, metrics)
        if accuracy is None:  # every epoch was done before this call
            accuracy = evaluate(model, val_batches.epoch(), dtype)
    return {"pretrain_top1": 100 * accuracy}
