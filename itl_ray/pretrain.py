"""Pretraining AlexNet on an ImageNet subset: a plain SGD loop counted in iterations, Caffe's
schedule, a checkpoint every ``checkpoint_every`` iterations, resumable at any checkpoint.

The recipe is Caffe's (``models/bvlc_reference_caffenet/solver.prototxt``, the schedule of the
network the study trained; sources beside each field of ``PretrainConfig``): SGD with momentum 0.9,
weight decay 5e-4 on weights only, batch 256, base learning rate 0.01 (biases 0.02: the
prototxt's ``lr_mult: 2``, see ``models.parameter_groups``), multiplied by ``gamma`` 0.1 every
100,000 iterations (``lr_policy: "step"``), 450,000 iterations, random 227 px crops of 256 px
images and flips. Caffe's step policy sets the rate of iteration ``i`` (0-based) to
``base_lr * gamma ** floor(i / stepsize)`` (``Schedule.lr_at``).

The schedule describes the **full** training set (every training image of ``data.imagenet``;
450k iterations are 89.9 epochs of ILSVRC-2012's 1,281,167 images). A subset follows
``subset_schedule`` (see ``plan_schedule``):
- ``same_iterations`` (default): the full schedule's iterations and drops. Compute is the same for
  every subset, so the images-per-class curve measures data alone; small subsets take many passes
  (50 per class: 2,300 epochs) and their ImageNet top-1 shows overfitting more than their transfer
  does. Why the default: the study trained with Caffe, whose solver counts iterations; the same
  solver file run on a subset's data gives exactly this. An **assumption**: the study does not say.
- ``same_epochs``: as many passes as the full schedule makes (89.9), so iterations shrink with the
  subset (50 per class: 17.6k iterations, 3.9% of the updates) and the drops move with them. Cheap,
  but a small subset then differs in data *and* in training, and Caffe's Gaussian-initialised
  AlexNet spends its first thousands of iterations near its initial loss, so the smallest subsets
  may be undertrained: the curve's left end drops for a reason that is not data.
- ``scaled``: iterations and drops times (subset / full images) ** ``subset_power`` (0.5: 50 per
  class gets 88.9k iterations, 455 epochs): between the two.
For label sets over all images (the hierarchy experiment) the three coincide.

A run is a loop over epochs of the subset, each epoch's order, crops and flips drawn before its
first batch (``crop_plans``); the last batch of an epoch may be smaller (Caffe wraps around the
data instead). Checkpoints: every ``checkpoint_every`` iterations, at the end, and, in a run
shorter than ``checkpoint_every`` (small subsets, the mini-benchmark), at the end of every epoch.
Each checkpoint is followed by a validation pass (``pretrain/val_top1``). A checkpoint holds the
model, the optimizer, the crop generator as it was at the start of the epoch in flight, torch's
global generator (dropout), the iteration and the partial loss average: a resumed run redraws that
epoch, skips the batches done, and ends bit-identical to an uninterrupted one on a CPU. Checkpoints
are read with ``torch.load(weights_only=True)``: only tensors and plain values load, never code.

Speed (see itl_ray/fast_loader.py and ``itl-ray bench``): images come from the prepared shards through
the fast input pipeline by default (decoded on the GPU or by CPU threads, crops batched, prefetched
while the previous step trains); on CUDA the step runs under bf16 autocast with channels_last
memory and torch.compile.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Callable, Iterable, Literal

import torch
import torch.nn.functional as F
from itl_ray.bounds import Ge, Gt, Interval

from itl_ray.crop_plans import Augment
from itl_ray.errors import UserError
from itl_ray.fast_loader import FastLoader, default_workers
from itl_ray.files import atomic_path
from itl_ray.image_rows import ImageRows
from itl_ray.models import AlexNet, parameter_groups
from itl_ray.progress import Progress
from itl_ray.torchvision_loader import TorchvisionLoader

Switch = Literal["auto", "on", "off"]  # auto: on for CUDA
LR_GAMMA = 0.1  # solver.prototxt ``gamma: 0.1``: the rate is multiplied by this at every step
ILSVRC2012_TRAIN_IMAGES = 1_281_167  # the full training set the default schedule was written for

# Curves (MLflow groups them by the prefix before "/"); step = iteration.
LOSS_CURVE, LR_CURVE, VAL_TOP1_CURVE = "pretrain/loss", "pretrain/lr", "pretrain/val_top1"


@dataclass(frozen=True)
class PretrainConfig:
    """The ``pretrain`` section of a trial: which ImageNet images and labels, the SGD schedule, and
    how images reach the model. Sources: Caffe's ``models/bvlc_reference_caffenet/solver.prototxt``
    (``base_lr: 0.01``, ``lr_policy: "step"``, ``gamma: 0.1``, ``stepsize: 100000``,
    ``max_iter: 450000``, ``momentum: 0.9``, ``weight_decay: 0.0005``, ``snapshot: 10000``) and
    ``train_val.prototxt`` (``batch_size: 256``). The checkpoint and curve intervals change what is
    logged and what a lost node costs, not what is learnt. Settings that change only speed are in
    ``PretrainRuntime``. Bounds and choices are declared on the fields and checked by
    ``config.from_dict``."""

    # ImageNet classes drawn (nested, seeded); null: all of them.
    num_classes: Annotated[int, Ge(1)] | None = None
    # Images per class (nested, seeded); 0: no pretraining, random initialisation (the control).
    images_per_class: Annotated[int, Ge(0)] = 1300
    label_set: str = "fine"  # fine, or a WordNet label set that merges classes (see label_sets.py)
    shortfall: Literal["take_all", "error"] = "take_all"  # a class with fewer images: take them all (recorded), or stop
    # The schedule of the full training set: iterations (Caffe's solver: max_iter, stepsize) or
    # epochs (epochs, lr_drop_every; torchvision's AlexNet recipe: 90 and 30).
    schedule: Literal["iterations", "epochs"] = "iterations"
    iterations: Annotated[int, Ge(1)] = 450_000  # SGD steps (max_iter), schedule: iterations
    # The rate drops by 10 every this many iterations (stepsize), schedule: iterations.
    lr_step_iterations: Annotated[int, Ge(1)] = 100_000
    epochs: Annotated[int, Ge(1)] = 90  # passes over the full training set, schedule: epochs
    lr_drop_every: Annotated[int, Ge(1)] = 30  # epochs between drops by 10, schedule: epochs
    # How a subset's schedule follows from the full one: same_iterations, same_epochs or scaled
    # (iterations times (subset / full images) ** subset_power); see the module docstring.
    subset_schedule: Literal["same_iterations", "same_epochs", "scaled"] = "same_iterations"
    subset_power: Annotated[float, Interval(ge=0, le=1)] = 0.5
    # Images per SGD step (train_val.prototxt batch_size). Upper bound 65,536 (an assumption): 256x the
    # study's, beyond any large-batch AlexNet recipe.
    batch_size: Annotated[int, Interval(ge=1, le=65536)] = 256
    lr: Annotated[float, Gt(0)] = 0.01  # base_lr at batch_size, for weights (biases: twice, lr_mult 2)
    momentum: Annotated[float, Interval(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Ge(0)] = 5e-4  # on weights (biases: decay_mult 0)
    # A checkpoint (and a validation pass) every this many iterations; runs shorter than this
    # checkpoint at the end of every epoch instead. 5,000 iterations are about one ImageNet epoch
    # at batch 256, the most a lost node may cost (Caffe's solver snapshots every 10,000).
    checkpoint_every: Annotated[int, Ge(1)] = 5_000
    # pretrain/loss and pretrain/lr, averaged over this many iterations.
    curve_every: Annotated[int, Ge(1)] = 100
    # Input pipeline: fast (fast_loader.FastLoader: decoded once into a cache, or every epoch by CPU
    # threads or nvJPEG on the GPU, crops batched, prefetched) or torchvision (PIL + transforms in
    # DataLoader processes, the plain way, kept for comparison). Both cut the same windows from the
    # same plan, but PIL's and torch's resampling round differently (pixels agree exactly only
    # where the shards hold the crops' shorter side: tests/test_fast_loader.py), so it is part of
    # what a trial computes, not a runtime setting.
    pipeline: Literal["fast", "torchvision"] = "fast"
    # crop: the study's (Caffe's) random 227 px crops of the image resized to 256 px (256/227 of
    # the crop at other resolutions) and center-squared; random_resized_crop: torchvision's (8-100%
    # of the area, aspect 3/4..4/3). Both flip half the images.
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


@dataclass(frozen=True)
class Schedule:
    """A run's schedule in iterations: ``iterations`` SGD steps in all, the rate multiplied by
    ``LR_GAMMA`` every ``lr_step`` iterations, ``batches_per_epoch`` steps per pass over the subset."""

    iterations: int
    lr_step: int
    batches_per_epoch: int

    def lr_at(self, iteration: int, base_lr: float) -> float:
        """The base rate at 0-based ``iteration``: Caffe's step policy, ``base_lr * gamma **
        floor(iteration / stepsize)``."""
        return base_lr * LR_GAMMA ** (iteration // self.lr_step)

    @property
    def epochs(self) -> float:
        """Passes over the subset (fractional when the run ends mid-epoch)."""
        return self.iterations / self.batches_per_epoch

    def as_dict(self) -> dict[str, int]:
        return {"iterations": self.iterations, "lr_step": self.lr_step, "batches_per_epoch": self.batches_per_epoch}


def plan_schedule(config: PretrainConfig, images: int, full_images: int) -> Schedule:
    """The schedule of a run on ``images`` training images, from ``config``'s schedule of the full
    training set (``full_images``) and its ``subset_schedule`` rule (module docstring):
    same_iterations keeps iterations and drops; same_epochs keeps passes, iterations = full
    iterations x (subset's batches per epoch / full set's); scaled multiplies both by (images /
    full_images) ** subset_power. Every count is rounded and at least 1. ValueError for no images."""
    if images < 1 or full_images < 1:
        raise ValueError(f"a schedule needs images: {images} of {full_images}")
    per_epoch = math.ceil(images / config.batch_size)
    full_per_epoch = math.ceil(max(images, full_images) / config.batch_size)
    if config.schedule == "iterations":
        total, step = config.iterations, config.lr_step_iterations
    else:
        total, step = config.epochs * full_per_epoch, config.lr_drop_every * full_per_epoch
    if config.subset_schedule == "same_epochs":
        factor = per_epoch / full_per_epoch
    elif config.subset_schedule == "scaled":
        factor = (images / max(images, full_images)) ** config.subset_power
    else:
        factor = 1.0
    return Schedule(iterations=max(1, round(total * factor)), lr_step=max(1, round(step * factor)),
                    batches_per_epoch=per_epoch)


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


def load_state(path: Path, what: str) -> dict:
    """A file written by ``save_atomically`` (a checkpoint, a backbone's weights), read with
    ``torch.load(weights_only=True)``: tensors and plain values (numbers, strings, lists, dicts)
    load; anything else (a pickled object, which could run code when loaded) does not. Raises
    UserError naming ``what`` and ``path`` for such a file and for one that cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
        raise UserError(f"{what} {path} holds more than tensors and plain values ({reason.rstrip('.')}), so it "
                        "is not loaded; it was not written by itl_ray: delete it to start that stage again") from None
    except (RuntimeError, EOFError, OSError) as error:
        first = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise UserError(f"{what} {path} cannot be read ({first}); delete it to start that stage again") from None


def pretrain(
    model: AlexNet,
    train: ImageRows,
    val: ImageRows,
    config: PretrainConfig,
    device: torch.device,
    seed: int,
    checkpoint: Path,
    full_images: int | None = None,
    curve: Callable[[dict[str, float], int], None] = lambda metrics, step: None,
    on_checkpoint: Callable[[int], None] = lambda iteration: None,
    log: Callable[[str], None] = print,
    runtime: PretrainRuntime = PretrainRuntime(),
) -> dict:
    """Train ``model`` in place on ``train``; resumes from ``checkpoint`` when it exists.

    The schedule is ``plan_schedule(config, len(train), full_images)`` (``full_images``: training
    images of the whole dataset, default ``len(train)``). ``curve(metrics, iteration)`` receives
    ``pretrain/loss`` (mean over the last ``curve_every`` iterations) and ``pretrain/lr`` (the
    weights' rate) every ``curve_every`` iterations, and ``pretrain/val_top1`` (percent) after
    each checkpoint; ``on_checkpoint(iteration)`` is called once a checkpoint is on disk
    (a sweep saves the trial's folder then). Steps are iterations done, 1-based. Returns final
    metrics: ``pretrain_top1`` in percent on ``val``, the validation images of the trained classes.
    ``runtime`` sets how fast images arrive, not which (``PretrainRuntime``). Raises UserError for
    a checkpoint that does not load (``load_state``) or that was written for another schedule."""
    device = torch.device(device)
    schedule = plan_schedule(config, len(train), full_images or len(train))
    channels_last = switched(runtime.channels_last, device)
    dtype = autocast_dtype(config.precision, device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    groups = parameter_groups(model, config.lr, config.weight_decay)
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    generator = torch.Generator().manual_seed(seed)  # the crops and the order of every epoch
    iteration, loss_sum, loss_count = 0, 0.0, 0
    if checkpoint.is_file():
        state = load_state(checkpoint, "pretraining checkpoint")
        if state.get("schedule") != schedule.as_dict():
            raise UserError(f"pretraining checkpoint {checkpoint} was written for another schedule "
                            f"({state.get('schedule')}, now {schedule.as_dict()}); delete it to pretrain again")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])  # dropout draws from torch's global generator
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        iteration, loss_sum, loss_count = state["iteration"], state["loss_sum"], state["loss_count"]
        log(f"pretrain: resumed after iteration {iteration:,} (epoch {iteration / schedule.batches_per_epoch:.2f})")
    small = schedule.iterations < config.checkpoint_every  # such runs checkpoint at every epoch's end
    accuracy = None
    with contextlib.ExitStack() as stack:
        if channels_last:  # hand the model back in the usual layout
            stack.callback(model.to, memory_format=torch.contiguous_format)
        train_batches = stack.enter_context(make_loader(train, model.resolution, config, runtime, device, train=True,
                                                        log=log))
        val_batches = stack.enter_context(make_loader(val, model.resolution, config, runtime, device, train=False,
                                                      log=log))
        training_threads = stack.enter_context(threads_beside(train_batches))
        if iteration < schedule.iterations:
            where = device.type if device.type == "cuda" else f"{training_threads} CPU threads"
            log(f"pretrain: {schedule.iterations:,} iterations of batch {config.batch_size} ({schedule.epochs:.1f} "
                f"epochs of {len(train):,} images, rate x{LR_GAMMA:g} every {schedule.lr_step:,}), "
                f"{train_batches.describe()}, {'bf16' if dtype else 'fp32'}"
                f"{', channels_last' if channels_last else ''} on {where}")
        compile = switched(runtime.compile, device) and iteration < schedule.iterations
        step = TrainStep(model, optimizer, device, dtype, compile, log)
        label = f"pretrain from iteration {iteration:,}" if iteration else "pretrain"
        progress = Progress(label, schedule.iterations - iteration, unit="it", log=log) \
            if iteration < schedule.iterations else None
        # The loss summed over the curve's window, on the device: read once per window, not per step.
        window = torch.tensor(loss_sum, dtype=torch.float64, device=device)
        started, images_seen = time.perf_counter(), 0
        while iteration < schedule.iterations:
            epoch_start = generator.get_state()  # a checkpoint inside this epoch redraws it from here
            first = iteration % schedule.batches_per_epoch
            model.train()
            for images, labels in train_batches.epoch(generator, start=first):
                lr = schedule.lr_at(iteration, config.lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_mult"]
                loss = step(images, labels)
                iteration += 1
                images_seen += len(labels)
                progress.update()
                window += loss
                loss_count += 1
                if iteration % config.curve_every == 0 or iteration == schedule.iterations:
                    curve({LOSS_CURVE: window.item() / loss_count, LR_CURVE: lr}, iteration)
                    window.zero_()
                    loss_count = 0
                epoch_end = iteration % schedule.batches_per_epoch == 0
                if (iteration % config.checkpoint_every == 0 or iteration == schedule.iterations
                        or (small and epoch_end)):
                    # The checkpoint of an epoch's last step starts the next epoch from the generator's
                    # state now; any other holds the state this epoch was drawn from.
                    save_atomically(
                        {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "generator": generator.get_state() if epoch_end else epoch_start,
                         "torch_rng": torch.get_rng_state(),
                         "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                         "iteration": iteration, "loss_sum": window.item(), "loss_count": loss_count,
                         "schedule": schedule.as_dict(), "config": asdict(config)},
                        checkpoint,
                    )
                    accuracy = evaluate(model, val_batches.epoch(), dtype)
                    model.train()
                    rate = images_seen / max(1e-9, time.perf_counter() - started)
                    log(f"pretrain: iteration {iteration:,}/{schedule.iterations:,} (epoch "
                        f"{iteration / schedule.batches_per_epoch:.1f}) lr {lr:g}, val top-1 {100 * accuracy:.1f}% "
                        f"({rate:,.0f} img/s)")
                    curve({VAL_TOP1_CURVE: 100 * accuracy}, iteration)
                    on_checkpoint(iteration)
                    started, images_seen = time.perf_counter(), 0
                if iteration == schedule.iterations:
                    break
        if progress is not None:
            progress.close()
        if accuracy is None:  # every iteration was done before this call
            accuracy = evaluate(model, val_batches.epoch(), dtype)
    return {"pretrain_top1": 100 * accuracy}
