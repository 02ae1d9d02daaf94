"""What a trial costs: pretraining images and iterations, and GPU-hours on one GPU.

GPU time comes from one measured (or assumed) throughput figure, training images per second of
AlexNet at some width and resolution, scaled to each stage by floating-point operations (FLOPs,
counted by ``torch.utils.flop_counter`` on the meta device, so nothing is allocated or run):

    seconds = (training images x 3 F + inference images x F) / (3 F_ref x img_per_s)

where F is one image's forward FLOPs through the network the stage runs, F_ref that of the network
the throughput was measured on, and a training step costs about three forward passes (forward,
backward for activations, backward for weights). Stages: pretraining (its schedule from
``pretrain.plan_schedule``, and a validation pass at each checkpoint), the action and scene
fine-tunings (whole network on each crop; SUN397 once per partition) and induction accuracy (a
forward pass per memory and validation image) scale from the classification figure; Fast R-CNN detection on VOC 2007 (conv1..conv5 on the whole scaled image,
fc6/fc7 on each region: ``rois_per_image`` in training, every proposal at test) from its own
figure, ``DETECTION_IMG_PER_S``.

**Assumptions.** FLOP scaling ignores what does not scale with FLOPs: a small network (the demo's
quarter width at 64 px needs 1/123 of the study's FLOPs) is held back on a GPU by kernel launches
and the input pipeline, so its figure is a lower bound. Without a measurement the throughput is
``DEFAULT_IMG_PER_S``. Pretraining images come from the prepared ImageNet when it is there, else
from ILSVRC-2012's nominal counts (``NOMINAL``).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from itl_ray.errors import UserError

# Assumed throughput without a measurement: the project's end-to-end target for the study's
# AlexNet (width 1.0) at 224 px on one H100 (README, "Input pipeline and speed"; the network alone
# measured 38k img/s bf16 there, ../shared/reference/ANCHORS.md). An assumption, and said so.
DEFAULT_IMG_PER_S = 25_000.0
DEFAULT_REFERENCE = (1.0, 224)  # (width, resolution) the default figure is for

# Detection trains at a much lower rate than its FLOPs suggest (large images, one RoI batch per
# image, box targets on the CPU): the measured anchor, Faster R-CNN on AlexNet conv5 at 600 px,
# batch 4, fp32, trains at 118 img/s on one H100 (../shared/reference/ANCHORS.md). Assumed here for
# the study's network on 600 x 800 images with 512 regions per image (torchvision's default
# region batch), and scaled by FLOPs to a trial's network, image size and regions.
DETECTION_IMG_PER_S = 118.0
DETECTION_REFERENCE = (1.0, 227, 600, 800, 512)  # (width, resolution, height, image width, regions)

# Where `itl-ray bench` leaves its last result (relative to the working directory).
BENCH_RESULT = Path("itl_runs/bench/latest.json")

# Nominal dataset sizes, used when the prepared folder is not there (a dry run on a laptop).
NOMINAL = {
    "imagenet_train_images": 1_281_167,  # ILSVRC-2012 train (Russakovsky et al. 2015)
    "imagenet_classes": 1000,
    "imagenet_val_per_class": 50,  # ILSVRC-2012 validation: 50 per class
    "pascal_removed_classes": 771,  # the study: 229 classes overlap a VOC class
    "split_classes": 500,  # each half of a split
    "voc2007_trainval": 5011, "voc2007_test": 4952,  # VOC 2007 devkit
    "voc2012_action_train_persons": 3134, "voc2012_action_val_persons": 3144,  # VOC 2012 devkit, action task
    "sun397_train": 19_850, "sun397_test": 19_850,  # 50 + 50 per scene in each official partition
}
VOC_ASPECT = 4 / 3  # VOC images are mostly 500 x 375 (landscape)


@dataclass(frozen=True)
class Throughput:
    """Training images per second of AlexNet at ``width`` and ``resolution`` on one GPU, and where
    the figure comes from (said beside every estimate)."""

    img_per_s: float
    width: float
    resolution: int
    source: str


def throughput(img_per_s: float | None = None, bench_result: Path = BENCH_RESULT) -> Throughput:
    """``img_per_s`` when given (for the study's AlexNet at 224 px), else the last
    ``itl-ray bench --device cuda`` result, else the assumed default."""
    width, resolution = DEFAULT_REFERENCE
    if img_per_s is not None:
        if not 0 < img_per_s < math.inf:
            raise UserError(f"--img-per-s must be a positive, finite number of images per second, got {img_per_s}")
        return Throughput(img_per_s, width, resolution, f"--img-per-s {img_per_s:,.0f} (AlexNet width 1.0, 224 px)")
    note = ""
    if bench_result.is_file():
        try:
            result = json.loads(bench_result.read_text())
            if result.get("device") == "cuda":
                return Throughput(float(result["project_img_s"]), float(result["width"]), int(result["resolution"]),
                                  f"`itl-ray bench` of {result.get('date', '?')} on {result.get('device_name', 'a GPU')}: "
                                  f"{float(result['project_img_s']):,.0f} img/s at width {result['width']}, "
                                  f"{result['resolution']} px ({bench_result})")
            note = f"; {bench_result} is a CPU measurement, not used"
        except (ValueError, KeyError, TypeError):
            note = f"; {bench_result} is not a bench result, not used"
    return Throughput(DEFAULT_IMG_PER_S, width, resolution,
                      f"ASSUMED {DEFAULT_IMG_PER_S:,.0f} img/s for AlexNet width 1.0 at 224 px on one GPU (no "
                      f"`itl-ray bench --device cuda` result in {bench_result}{note}; measure one or pass --img-per-s)")


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------

def _flops(run) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


@functools.lru_cache(maxsize=None)
def image_flops(width: float, resolution: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one ``resolution`` x ``resolution`` image through
    the whole AlexNet at ``width`` (1.45 GFLOPs for the study's network at 227 px)."""
    import torch

    from itl_ray.models import AlexNet

    def forward():
        AlexNet(1000, width=width, resolution=resolution)(torch.empty(1, 3, resolution, resolution))

    return _flops(forward)


@functools.lru_cache(maxsize=None)
def detection_flops(width: float, resolution: int, height: int, image_width: int) -> tuple[float, float]:
    """(conv1..conv5 on one ``height`` x ``image_width`` image, fc6 + fc7 + heads on one region)
    forward FLOPs of the Fast R-CNN built on AlexNet at ``width`` (pretrained at ``resolution``)."""
    import torch

    from itl_ray.models import AlexNet

    def build():
        return AlexNet(21, width=width, resolution=resolution)

    def convolutions():
        build().features(torch.empty(1, 3, height, image_width))

    model = None

    def region():
        nonlocal model
        model = build()
        model.embed(torch.empty(1, model.conv5_channels, model.grid, model.grid))

    fc6_fc7 = _flops(region)
    heads = 2 * model.embed_dim * (21 + 4 * 20)  # 20 classes + background scored, 4 box numbers per class
    return _flops(convolutions), fc6_fc7 + heads


# ---------------------------------------------------------------------------------------------
# Images and iterations
# ---------------------------------------------------------------------------------------------

def iterations(images: int, epochs: int, batch_size: int) -> int:
    """SGD steps of ``epochs`` passes over ``images`` in batches of ``batch_size`` (the last,
    smaller batch of an epoch is a step too)."""
    return epochs * math.ceil(images / batch_size) if images else 0


def validations(schedule, checkpoint_every: int) -> int:
    """Validation passes of a pretraining: one per checkpoint (every ``checkpoint_every``
    iterations and at the end; at every epoch's end in a run shorter than ``checkpoint_every``)."""
    if schedule.iterations < checkpoint_every:
        return math.ceil(schedule.iterations / schedule.batches_per_epoch)
    return schedule.iterations // checkpoint_every + (schedule.iterations % checkpoint_every > 0)


@functools.lru_cache(maxsize=8)
def _imagenet_counts(folder: str) -> tuple[dict[str, int], dict[str, int]]:
    """Train and val images per class of a prepared ImageNet (raises UserError when not prepared)."""
    from itl_ray.shards import Prepared

    data = Prepared(folder, "imagenet", "data.imagenet")
    labels, splits = data.column("label"), data.column("split")
    train: dict[str, int] = {}
    val: dict[str, int] = {}
    for label, split in zip(labels, splits):
        parts = split.split(",")
        if "train" in parts:
            train[label] = train.get(label, 0) + 1
        if "val" in parts:
            val[label] = val.get(label, 0) + 1
    return train, val


def _drawn_from(label_set: str, classes: tuple[str, ...]) -> tuple[str, ...]:
    """The classes a label set lets a subset draw from: all for fine and coarse sets; the kept
    ones for sets that leave classes out (pascal_removed, split halves)."""
    if label_set in ("fine", "parent") or label_set.startswith(("up_down_", "down_up_")):
        return classes
    from itl_ray import label_sets

    return tuple(sorted(label_sets.label_set(label_set, classes)))


@dataclass(frozen=True)
class PretrainingSize:
    images: int  # training images of the subset
    val_images: int  # validation images of its classes (evaluated at every checkpoint)
    nominal: bool  # True: ILSVRC-2012's nominal counts, the prepared data was not there
    full_images: int = NOMINAL["imagenet_train_images"]  # the whole training set: the schedule's reference
    classes: int = 0  # fine classes of the subset (induction's memory holds some of each)


def pretraining_size(config) -> PretrainingSize:
    """Images a trial pretrains on: exact (the same subset rule as the trial) when its prepared
    ImageNet is there, else from ILSVRC-2012's nominal counts."""
    pre = config.pretrain
    try:
        train, val = _imagenet_counts(config.data.imagenet)
    except UserError:
        train = val = {}
    if train:
        from itl_ray import subsets

        pool = _drawn_from(pre.label_set, tuple(sorted(train)))
        chosen = subsets.choose_classes(pool, pre.num_classes, config.seed) if pre.images_per_class else pool
        images = sum(min(train[wnid], pre.images_per_class) for wnid in chosen)
        return PretrainingSize(images, sum(val.get(wnid, 0) for wnid in chosen), nominal=False,
                               full_images=sum(train.values()), classes=len(chosen))
    classes = NOMINAL["imagenet_classes"]
    if pre.label_set == "pascal_removed":
        classes = NOMINAL["pascal_removed_classes"]
    elif pre.label_set.startswith(("random_", "minimal_")):
        classes = NOMINAL["split_classes"]
    classes = min(classes, pre.num_classes or classes)
    per_class = min(pre.images_per_class, NOMINAL["imagenet_train_images"] / NOMINAL["imagenet_classes"])
    return PretrainingSize(round(classes * per_class), classes * NOMINAL["imagenet_val_per_class"], nominal=True,
                           classes=classes)


def _prepared_count(folder: str, kind: str, split: str, persons: bool = False) -> int | None:
    try:
        data = _open(folder, kind)
    except UserError:
        return None
    rows = data.rows_in(split)
    if not persons:
        return len(rows)
    objects = data.column("objects")
    return sum(len(json.loads(objects[row])) for row in rows)


@functools.lru_cache(maxsize=16)
def _open(folder: str, kind: str):
    from itl_ray.shards import Prepared

    return Prepared(folder, kind)


def transfer_sizes(config) -> dict[str, int]:
    """Training and test images (persons for actions) of the three transfer tasks: the prepared
    data's counts where it is there, else the real datasets' nominal ones."""
    data = config.data
    counted = {
        "voc2007_trainval": _prepared_count(data.voc2007, "voc2007", "trainval"),
        "voc2007_test": _prepared_count(data.voc2007, "voc2007", "test"),
        "voc2012_action_train_persons": _prepared_count(data.voc2012, "voc2012-action", "train", persons=True),
        "voc2012_action_val_persons": _prepared_count(data.voc2012, "voc2012-action", "val", persons=True),
    }
    sizes = {key: NOMINAL[key] if value is None else value for key, value in counted.items()}
    for key, split in (("sun397_train", "Training"), ("sun397_test", "Testing")):  # summed over the partitions run
        per_partition = [_prepared_count(data.sun397, "sun397", f"{split}_{number:02d}")
                         for number in config.transfer.scene.partitions]
        sizes[key] = sum(NOMINAL[key] if count is None else count for count in per_partition)
    return sizes


# ---------------------------------------------------------------------------------------------
# GPU-hours
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialCost:
    pretrain_images: int
    iterations: int
    pretrain_gpu_hours: float
    transfer_gpu_hours: float
    nominal: bool  # pretraining images from nominal counts

    @property
    def gpu_hours(self) -> float:
        return self.pretrain_gpu_hours + self.transfer_gpu_hours


def trial_cost(config, speed: Throughput) -> TrialCost:
    """Pretraining images, iterations and GPU-hours of one trial at ``speed``."""
    from itl_ray.transfer.regions import schedule

    width, resolution = config.model.width, config.model.resolution
    seconds_per_flop = 1 / (3 * image_flops(speed.width, speed.resolution) * speed.img_per_s)
    pre = config.pretrain
    size = pretraining_size(config)
    image = image_flops(width, resolution)
    if size.images:
        from itl_ray.pretrain import plan_schedule

        plan = plan_schedule(pre, size.images, max(size.images, size.full_images))
        steps, seen = plan.iterations, min(plan.iterations * pre.batch_size, plan.epochs * size.images)
        pretrain_flops = (3 * seen + validations(plan, pre.checkpoint_every) * size.val_images) * image
    else:
        steps, pretrain_flops = 0, size.val_images * image

    sizes = transfer_sizes(config)
    detection = config.transfer.detection
    height = detection.image_size
    image_width = min(round(height * VOC_ASPECT), detection.max_size)
    convolutions, region = detection_flops(width, resolution, height, image_width)
    proposals = _proposals(detection, height, image_width)
    trained_images = schedule(detection, sizes["voc2007_trainval"]).iterations * detection.images_per_batch
    detection_flops_total = (
        trained_images * 3 * (convolutions + detection.rois_per_image * region)
        + sizes["voc2007_test"] * (convolutions + proposals * region))
    action, scene = config.transfer.action, config.transfer.scene
    if action.model == "crops":
        action_flops = image * (action.crops.epochs * 3 * sizes["voc2012_action_train_persons"]
                                + sizes["voc2012_action_val_persons"])
    else:  # whole images at action.image_size, a few regions each (persons per image: about 1.5 in VOC 2012)
        action_height = action.image_size
        action_convolutions, action_region = detection_flops(width, resolution, action_height,
                                                             min(round(action_height * VOC_ASPECT), action.max_size))
        train_images = max(1, round(sizes["voc2012_action_train_persons"] / 1.5))
        action_steps = schedule(action, train_images).iterations * action.images_per_batch
        action_flops = (action_steps * 3 * (action_convolutions + action.rois_per_batch / action.images_per_batch
                                            * action_region)
                        + sizes["voc2012_action_val_persons"] * (action_convolutions / 1.5 + action_region))
    ref_width, ref_resolution, ref_height, ref_image_width, ref_regions = DETECTION_REFERENCE
    ref_convolutions, ref_region = detection_flops(ref_width, ref_resolution, ref_height, ref_image_width)
    region_seconds = (detection_flops_total + action_flops) / (
        3 * (ref_convolutions + ref_regions * ref_region) * DETECTION_IMG_PER_S)
    induction = config.transfer.induction
    induction_images = size.classes * induction.train_per_class + size.val_images if induction.enabled else 0
    classification_flops = image * (scene.epochs * 3 * sizes["sun397_train"] + sizes["sun397_test"] + induction_images)
    return TrialCost(
        pretrain_images=size.images,
        iterations=steps,
        pretrain_gpu_hours=pretrain_flops * seconds_per_flop / 3600,
        transfer_gpu_hours=(region_seconds + classification_flops * seconds_per_flop) / 3600,
        nominal=size.nominal,
    )


@functools.lru_cache(maxsize=64)
def _proposals(detection, height: int, width: int) -> int:
    """Boxes scored per test image: Selective Search's top 2,000 (Fast R-CNN's ``top_k``), or the
    sliding windows of an image this size."""
    from itl_ray.transfer.detection import sliding_window_proposals

    if detection.proposals == "selective_search":
        return 2000
    return len(sliding_window_proposals(height, width, detection))
