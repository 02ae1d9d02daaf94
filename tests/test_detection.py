"""The VOC 2007 detection stage (Fast R-CNN's CaffeNet recipe) on a tiny generated VOC2007 dataset
in the real layout: the recipe's values, region sampling, box-target normalisation, test-time
thresholding, the per-image tables reproducing the logged mAP, the bad inputs, and images read a
few at a time."""

from __future__ import annotations

import math
import random
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from itl_ray.datasets.voc import VOC_CLASSES, VocSplit, VocSplits, voc_images, voc_splits
from itl_ray.errors import UserError
from itl_ray.metrics import box_iou, mean_ap, ranked_detection_ap
from itl_ray.models import AlexNet
from itl_ray.transfer.detection import (DetectionConfig, DetectionRuntime, decode_boxes, detect_in_image, encode_boxes,
                                        evaluate_detection, sample_rois, sliding_window_proposals, training_regions)
from itl_ray.transfer.image_stream import ImageStream

CPU = torch.device("cpu")
# Each class is a solid rectangle of one colour and shape: easy to learn from a random backbone.
CLASS_LOOKS = {
    "car": ((200, 30, 30), 1.6),  # red, wide
    "dog": ((30, 60, 200), 1.0),  # blue, square
    "person": ((30, 170, 40), 0.5),  # green, tall
}


def _annotation(image_id: str, width: int, height: int, objects: list[tuple[str, tuple[int, ...], bool]]) -> str:
    parts = [f"<annotation><folder>VOC2007</folder><filename>{image_id}.jpg</filename>",
             f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"]
    for name, (xmin, ymin, xmax, ymax), difficult in objects:
        parts.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>{int(difficult)}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
                     f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts)


def write_tiny_voc2007(root: Path, trainval: int, test: int, seed: int = 0) -> Path:
    """A VOC2007 folder with ``trainval`` + ``test`` images of 1-2 coloured rectangles on noise.
    Small objects (shorter side under 22 px) are marked difficult, as VOC marks hard ones."""
    rng = random.Random(seed)
    base = root / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    ids = {"trainval": [], "test": []}
    for index in range(trainval + test):
        split = "trainval" if index < trainval else "test"
        image_id = f"{index:06d}"
        width, height = rng.randint(128, 176), rng.randint(112, 136)
        noise = np.random.default_rng(seed * 100_003 + index).integers(90, 171, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(noise)
        draw = ImageDraw.Draw(image)
        objects = []
        for _ in range(rng.randint(1, 2)):
            name = rng.choice(sorted(CLASS_LOOKS))
            colour, aspect = CLASS_LOOKS[name]
            side = rng.uniform(14, 70) if rng.random() < 0.15 else rng.uniform(34, 70)
            box_width = min(round(side * math.sqrt(aspect)), width - 4)
            box_height = min(round(side / math.sqrt(aspect)), height - 4)
            for _attempt in range(20):
                left, top = rng.randint(0, width - box_width), rng.randint(0, height - box_height)
                box = (left + 1, top + 1, left + box_width, top + box_height)  # 1-based inclusive
                if all(box[2] < other[0] or other[2] < box[0] or box[3] < other[1] or other[3] < box[1]
                       for _, other, _ in objects):
                    break
            else:
                continue
            draw.rectangle((box[0] - 1, box[1] - 1, box[2] - 1, box[3] - 1), fill=colour)
            objects.append((name, box, min(box_width, box_height) < 22))
        image.save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (base / "Annotations" / f"{image_id}.xml").write_text(_annotation(image_id, width, height, objects))
        ids[split].append(image_id)
    for split, names in ids.items():
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root / "VOCdevkit"


def prepared_voc(folder: Path, trainval: int, test: int, seed: int):
    from itl_ray.prepare import prepare
    from itl_ray.shards import Prepared

    root = write_tiny_voc2007(folder, trainval=trainval, test=test, seed=seed)
    prepare("voc2007", str(root), folder / "prepared", workers=1)
    return Prepared(folder / "prepared", "voc2007")


# ---------------------------------------------------------------------------------------------
# Fixtures: the dataset, a backbone, one trained run shared by the tests that read its outcome

PRESENT = ("car", "dog", "person")
# What this tiny set needs instead of the real-data recipe: its ~150 px images at their size,
# sliding windows, a short schedule with a larger rate.
TINY = dict(proposals="sliding_window", image_size=128, max_size=213, iterations=300, lr_step=225, lr=0.01)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_voc(tmp_path_factory.mktemp("voc"), trainval=60, test=30, seed=1)


@pytest.fixture(scope="module")
def voc(prepared) -> VocSplits:
    """Written in the devkit layout, prepared into shards, read back as a trial reads it."""
    return voc_splits(prepared, "trainval", "test")


def small_backbone() -> AlexNet:
    """The mini-benchmark's network (width 0.25, 64 px, pool5 grid 1, He initialisation as in
    sweeps/smoke.yaml), untrained but with fc6/fc7 at the activation scale of a trained one.
    Caffe's initialisation (std 0.005) leaves an untrained fc7 almost constant across regions (its
    spread over regions is ~4e-4), so a detector could learn little from it in seconds; He
    initialisation stands in for pretraining."""
    torch.manual_seed(0)
    backbone = AlexNet(num_classes=10, width=0.25, resolution=64, init="kaiming")
    for fc in (backbone.embed.fc6, backbone.embed.fc7):
        torch.nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
        torch.nn.init.zeros_(fc.bias)
    return backbone


@pytest.fixture(scope="module")
def trained(voc):
    backbone = small_backbone()
    before = {name: value.clone() for name, value in backbone.state_dict().items()}
    lines, curves = [], []
    output = evaluate_detection(backbone, voc, DetectionConfig(**TINY), CPU, seed=0, log=lines.append,
                                curve=lambda metrics, step: curves.append((step, metrics)))
    untrained = evaluate_detection(backbone, voc, DetectionConfig(**{**TINY, "iterations": 0}), CPU, seed=0,
                                   log=lambda line: None)
    return {"output": output, "untrained": untrained.metrics, "lines": lines, "curves": curves,
            "backbone": backbone, "before": before}


# ---------------------------------------------------------------------------------------------
# The recipe


def test_defaults_are_fast_rcnns_caffenet_recipe():
    config = DetectionConfig()
    assert config.proposals == "selective_search"
    assert (config.image_size, config.max_size) == (600, 1000)  # config.py TRAIN/TEST.SCALES, MAX_SIZE
    assert (config.iterations, config.lr_step, config.epochs) == (40000, 30000, 0)  # --iters; stepsize
    assert (config.lr, config.momentum, config.weight_decay) == (0.001, 0.9, 0.0005)  # solver.prototxt
    assert (config.bias_lr_multiplier, config.bias_decay_multiplier) == (2.0, 0.0)  # train.prototxt biases
    assert config.frozen_convs == 1 and config.conv_lr_scale == config.head_lr_scale == 1.0  # conv1 lr_mult 0
    assert (config.images_per_batch, config.rois_per_batch, config.rois_per_image) == (2, 128, 64)
    assert (config.fg_fraction, config.fg_iou, config.bg_iou_low, config.bg_iou_high) == (0.25, 0.5, 0.1, 0.5)
    assert config.flip_probability == 0.5 and config.train_difficult is True
    assert (config.box_regression_iou, config.box_normalisation) == (0.5, "per_class")
    assert config.roi_pool == "max"
    assert (config.score_threshold, config.nms_iou, config.max_detections) == (0.05, 0.3, 100)


def test_new_layers_are_initialised_as_the_prototxt_says():
    from itl_ray.transfer.detection import FastRCNN
    from itl_ray.transfer.regions import RegionNetwork, child_generator

    model = FastRCNN(RegionNetwork(AlexNet(10, width=1.0, resolution=227)), 20, child_generator(0, 0))
    assert model.classifier.weight.shape == (21, 4096) and model.box_regressor.weight.shape == (80, 4096)
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert model.box_regressor.weight.std().item() == pytest.approx(0.001, rel=0.02)
    assert (model.classifier.bias == 0).all() and (model.box_regressor.bias == 0).all()
    assert model.network.grid == 6  # roi_pool5 pooled_w/h 6 at 227 px


# ---------------------------------------------------------------------------------------------
# The task end to end


def test_fixture_has_the_cases_the_protocol_handles(voc):
    objects = [obj for image in voc.train.images + voc.test.images for obj in image.objects]
    assert {obj.name for obj in objects} == set(PRESENT)
    assert any(obj.difficult for obj in objects) and not all(obj.difficult for obj in objects)
    assert any(len(image.objects) == 2 for image in voc.test.images)


def test_returns_map_and_one_ap_per_class_present_in_test(trained):
    metrics = trained["output"].metrics
    assert set(metrics) == {"voc07_det_map"} | {f"voc07_det_ap/{name}" for name in PRESENT}
    assert all(0.0 <= value <= 100.0 for value in metrics.values())
    assert metrics["voc07_det_map"] == pytest.approx(sum(metrics[f"voc07_det_ap/{name}"] for name in PRESENT) / 3)
    # The classes without test objects are named, not dropped silently.
    absent = [line for line in trained["lines"] if "no non-difficult test objects" in line]
    assert len(absent) == 1 and all(name in absent[0] for name in VOC_CLASSES if name not in PRESENT)


def test_detector_learns_the_easy_task(trained):
    # Untrained (no iteration: random classifier and box regression on the same backbone) the
    # detector ranks windows at random: about 0 mAP here.
    assert trained["untrained"]["voc07_det_map"] < 10
    assert trained["output"].metrics["voc07_det_map"] > trained["untrained"]["voc07_det_map"] + 25


def test_curves_every_twenty_iterations_with_the_step_schedule(trained):
    steps = [step for step, _ in trained["curves"]]
    assert steps == list(range(20, 301, 20))
    metrics = dict(trained["curves"])
    assert set(metrics[20]) == {"detection/loss", "detection/loss_classification", "detection/loss_box",
                                "detection/lr"}
    assert metrics[220]["detection/lr"] == 0.01 and metrics[240]["detection/lr"] == pytest.approx(0.001)
    assert metrics[300]["detection/loss"] < metrics[20]["detection/loss"]
    assert any(line.startswith("detection: train: 300/300 it") for line in trained["lines"])


def test_callers_backbone_is_untouched(trained):
    after = trained["backbone"].state_dict()
    assert after.keys() == trained["before"].keys()
    assert all(torch.equal(after[name], trained["before"][name]) for name in after)


def test_per_image_tables_follow_the_contract_and_reproduce_the_logged_map(trained, voc):
    detections = trained["output"].per_image["voc07_det_detections"]
    positives = trained["output"].per_image["voc07_det_positives"]
    assert [(f.name, str(f.type)) for f in detections.schema] == [
        ("image_id", "string"), ("class", "string"), ("score", "double"), ("tp", "bool"), ("fp", "bool")]
    assert [(f.name, str(f.type)) for f in positives.schema] == [
        ("image_id", "string"), ("class", "string"), ("positives", "int64")]
    # Every test image and class has a positives row, images without objects of the class too.
    assert positives.num_rows == len(voc.test) * len(VOC_CLASSES)
    rows = detections.to_pydict()
    assert not any(tp and fp for tp, fp in zip(rows["tp"], rows["fp"]))
    counts = positives.to_pydict()
    aps = {}
    for name in VOC_CLASSES:
        chosen = [i for i, value in enumerate(rows["class"]) if value == name]
        total = sum(p for c, p in zip(counts["class"], counts["positives"]) if c == name)
        if total:
            aps[name] = ranked_detection_ap([rows["score"][i] for i in chosen], [rows["tp"][i] for i in chosen],
                                            [rows["fp"][i] for i in chosen], total)
    metrics = trained["output"].metrics
    assert {f"voc07_det_ap/{name}": 100 * ap for name, ap in aps.items()} == {
        key: value for key, value in metrics.items() if key.startswith("voc07_det_ap/")}  # exactly
    assert 100 * mean_ap(aps.values()) == metrics["voc07_det_map"]
    # At most 100 detections per image.
    assert max(rows["image_id"].count(image_id) for image_id in set(rows["image_id"])) <= 100


def test_same_seed_same_result_other_seed_other_result_any_number_of_workers(voc):
    small = VocSplits(replace(voc.train, images=voc.train.images[:16], rows=voc.train.rows[:16]),
                      replace(voc.test, images=voc.test.images[:8], rows=voc.test.rows[:8]))
    config = DetectionConfig(**{**TINY, "iterations": 20})
    runs = []
    for seed, workers in ((3, 1), (3, 3), (4, 1)):
        curves = []
        output = evaluate_detection(small_backbone(), small, config, CPU, seed=seed, log=lambda line: None,
                                    curve=lambda metrics, step: curves.append(metrics),
                                    runtime=DetectionRuntime(workers=workers))
        runs.append((output.metrics, output.per_image["voc07_det_detections"].to_pydict(), curves))
    assert runs[0] == runs[1]
    assert runs[0][2] != runs[2][2]


def test_empty_splits_are_user_errors(voc):
    empty = replace(voc.train, images=(), rows=())
    with pytest.raises(UserError, match="trainval split is empty"):
        evaluate_detection(small_backbone(), VocSplits(empty, voc.test), DetectionConfig(**TINY), CPU, seed=0)
    with pytest.raises(UserError, match="test split is empty"):
        evaluate_detection(small_backbone(), VocSplits(voc.train, replace(voc.test, name="voc2007 test", images=(),
                                                                          rows=())),
                           DetectionConfig(**TINY), CPU, seed=0)


def test_images_without_objects_and_all_difficult_classes(prepared):
    """Bad input, handled and counted: trainval images without objects are left out of training
    (Fast R-CNN's filter_roidb) and counted; a test image without objects is scored (its
    detections are false positives, its positives 0); a class whose test objects are all
    difficult has no AP and is named."""
    trainval, test = voc_images(prepared, "trainval")[:12], voc_images(prepared, "test")[:8]
    trainval = [replace(image, objects=()) if index < 3 else image for index, image in enumerate(trainval)]
    test = [replace(image, objects=()) if index == 0 else
            replace(image, objects=tuple(replace(obj, difficult=obj.difficult or obj.name == "dog")
                                         for obj in image.objects))
            for index, image in enumerate(test)]
    data = VocSplits(VocSplit("voc2007 trainval", tuple(trainval)), VocSplit("voc2007 test", tuple(test)))
    lines = []
    output = evaluate_detection(small_backbone(), data, DetectionConfig(**{**TINY, "iterations": 10}), CPU, seed=0,
                                log=lines.append)
    assert any("9 of 12 voc2007 trainval images to train on (3 without objects left out" in line for line in lines)
    assert "voc07_det_ap/dog" not in output.metrics and "voc07_det_ap/car" in output.metrics
    assert any("no non-difficult test objects of" in line and "dog" in line for line in lines)
    positives = output.per_image["voc07_det_positives"].to_pydict()
    assert sum(p for i, p in zip(positives["image_id"], positives["positives"]) if i == test[0].image_id) == 0
    rows = output.per_image["voc07_det_detections"].to_pydict()
    assert all(fp for i, fp in zip(rows["image_id"], rows["fp"]) if i == test[0].image_id)


def test_selective_search_proposals_come_from_the_split(voc):
    """With ``proposals: selective_search`` the stage scores the split's stored proposals (here
    given in memory); a prepared folder without them is a user error that says what to run."""
    images = voc_images(voc.train.prepared, "trainval")[:6]
    boxes = tuple(np.array([[0, 0, 40, 40], [10, 20, 90, 100], [50, 10, 120, 90]], dtype=np.float32) for _ in images)
    split = VocSplit("voc2007 trainval", tuple(images), given_proposals=boxes)
    config = DetectionConfig(**{**TINY, "proposals": "selective_search", "iterations": 4})
    output = evaluate_detection(small_backbone(), VocSplits(split, split), config, CPU, seed=0, log=lambda line: None)
    rows = output.per_image["voc07_det_detections"].to_pydict()
    # Every detection is one of an image's three proposals for one class, regressed.
    pairs = list(zip(rows["image_id"], rows["class"]))
    assert pairs and max(pairs.count(pair) for pair in set(pairs)) <= 3
    no_proposals = VocSplit("voc2007 trainval", tuple(images))
    with pytest.raises(UserError, match="no Selective Search proposals"):
        evaluate_detection(small_backbone(), VocSplits(no_proposals, no_proposals), config, CPU, seed=0)


def test_images_are_read_a_few_at_a_time_however_large_the_dataset(tmp_path, monkeypatch):
    """The stage holds a bounded number of decoded images whatever the dataset's size: every image
    the reader decodes is tracked until it is freed; ten times the images, the same peak (the
    earlier stage decoded every image up front)."""
    live = set()
    seen = {"decoded": 0, "peak": 0}
    decode = ImageStream._decode

    def tracked(self, index, flip):
        image = decode(self, index, flip)
        key = object()
        live.add(key)
        weakref.finalize(image.pixels, live.discard, key)
        seen["decoded"] += 1
        seen["peak"] = max(seen["peak"], len(live))
        return image

    monkeypatch.setattr(ImageStream, "_decode", tracked)
    torch.manual_seed(0)
    backbone = AlexNet(num_classes=4, width=0.125, resolution=48)
    results = []
    for count in (8, 80):
        seen.update(decoded=0, peak=0)
        data = voc_splits(prepared_voc(tmp_path / str(count), trainval=count, test=count, seed=2), "trainval", "test")
        config = DetectionConfig(**{**TINY, "image_size": 64, "max_size": 96, "epochs": 1, "rois_per_batch": 16})
        usable = len(training_regions(data.train, config).usable)
        evaluate_detection(backbone, data, config, CPU, seed=0, log=lambda line: None,
                           runtime=DetectionRuntime(workers=1, test_batch_size=2))
        results.append({**seen, "expected": 2 * (usable // 2) + count})  # one pass over trainval, then test
    assert all(result["decoded"] == result["expected"] for result in results)
    assert results[1]["decoded"] >= 9 * results[0]["decoded"]
    # Never more than the reader's look-ahead (4 with one worker) plus the batch in use (2 images
    # per training step, 2 per test forward pass here).
    assert results[0]["peak"] <= 6 and results[1]["peak"] <= 6


# ---------------------------------------------------------------------------------------------
# The pieces


def test_config_errors_name_the_field():
    """Bounds and choices are declared on the fields and checked by the config's one validator;
    the rules between fields (max_size >= image_size, bg_iou_low < bg_iou_high, rois_per_batch a
    multiple of images_per_batch) by DetectionConfig.check."""
    from itl_ray.config import validate

    assert validate(DetectionConfig(), "transfer.detection") == DetectionConfig()
    for config, message in (
        (DetectionConfig(fg_fraction=1.5), r"transfer\.detection\.fg_fraction=1\.5 is out of range; allowed: >= 0 and <= 1"),
        (DetectionConfig(bg_iou_low=0.6), r"transfer\.detection: bg_iou_low \(0\.6\) must be below bg_iou_high \(0\.5\)"),
        (DetectionConfig(window_sizes=()), r"transfer\.detection\.window_sizes=\[\] is out of range; allowed: not empty"),
        (DetectionConfig(window_sizes=(0.5, 1.5)), r"transfer\.detection\.window_sizes\[1\]=1\.5 is out of range"),
        (DetectionConfig(image_size=128, max_size=100),
         r"transfer\.detection: max_size \(100\) must be at least image_size \(128\)"),
        (DetectionConfig(epochs=-1), r"transfer\.detection\.epochs=-1 is out of range; allowed: >= 0"),
        (DetectionConfig(iterations=-1), r"transfer\.detection\.iterations=-1 is out of range; allowed: >= 0"),
        (DetectionConfig(box_target_stds=(0.1, 0.1, 0.2)), r"transfer\.detection\.box_target_stds: expected a list of 4"),
        (DetectionConfig(proposals="edge_boxes"), r"transfer\.detection\.proposals='edge_boxes' is not one of the "
                                                  r"choices: selective_search, sliding_window"),
        (DetectionConfig(rois_per_batch=127), r"transfer\.detection: rois_per_batch \(127\) must be a multiple of "
                                              r"images_per_batch \(2\)"),
        (DetectionConfig(box_normalisation="none"), r"transfer\.detection\.box_normalisation='none' is not one of"),
    ):
        with pytest.raises(UserError, match=message):
            validate(config, "transfer.detection")


def test_region_sampling_follows_fast_rcnn():
    config = DetectionConfig()
    gt_boxes = torch.tensor([[20.0, 30.0, 69.0, 79.0], [100.0, 10.0, 159.0, 49.0]])
    gt_labels = torch.tensor([12, 7])
    # Windows, and boxes shifted 1..10 px from each object: more foreground than a quarter of 64.
    shifts = torch.arange(1.0, 11.0)[:, None] * torch.tensor([1.0, 0.0, 1.0, 0.0])
    proposals = torch.cat((sliding_window_proposals(128, 170, config), gt_boxes[0] + shifts, gt_boxes[1] - shifts))
    regions, labels, targets = sample_rois(proposals, gt_boxes, gt_labels, config, torch.Generator().manual_seed(0))
    assert len(regions) == len(labels) == len(targets) == 64  # 128 RoIs from 2 images
    foreground = labels > 0
    assert foreground.sum() == 16  # round(0.25 * 64)
    best = box_iou(regions, gt_boxes).max(dim=1)
    assert (best.values[foreground] >= 0.5).all()
    assert torch.equal(labels[foreground], gt_labels[best.indices[foreground]])
    assert torch.equal(targets[foreground], gt_boxes[best.indices[foreground]])
    background = best.values[~foreground]
    assert ((background >= 0.1) & (background < 0.5)).all()


def test_ground_truth_boxes_join_the_proposals():
    # No window overlaps this thin object enough; its own box still makes a foreground region.
    config = DetectionConfig()
    proposals = sliding_window_proposals(128, 170, config)
    thin = torch.tensor([[50.0, 50.0, 53.0, 120.0]])
    assert box_iou(proposals, thin).max() < config.fg_iou
    _, labels, _ = sample_rois(proposals, thin, torch.tensor([3]), config, torch.Generator().manual_seed(0))
    assert (labels == 3).sum() == 1


def test_an_image_without_objects_has_no_region_to_train_on():
    config = DetectionConfig()
    proposals = sliding_window_proposals(128, 170, config)
    regions, labels, _ = sample_rois(proposals, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64), config,
                                     torch.Generator().manual_seed(0))
    assert len(regions) == 0 and len(labels) == 0  # no foreground, no background in [0.1, 0.5)


def test_box_target_statistics_per_class_with_flips():
    """Fast R-CNN's normalisation: per class, the mean and std of the targets of every region at
    IoU >= 0.5 (ground truth included) of every training image and its mirror image."""
    from itl_ray.datasets.voc import VocImage, VocObject

    image = VocImage("a", "row 0", 100, 100, (VocObject("cat", (11, 11, 50, 50)),))
    proposals = np.array([[10, 10, 49, 49], [12, 10, 51, 49], [10, 10, 59, 49], [60, 60, 90, 90]], np.float32)
    split = VocSplit("voc2007 trainval", (image,), given_proposals=(proposals,))
    config = DetectionConfig()
    stats = training_regions(split, config)
    assert stats.usable == [0] and stats.without_objects == 0
    gt = torch.tensor([[10.0, 10.0, 49.0, 49.0]])
    chosen = torch.tensor([[10.0, 10.0, 49.0, 49.0], [10.0, 10.0, 49.0, 49.0], [12.0, 10.0, 51.0, 49.0],
                           [10.0, 10.0, 59.0, 49.0]])  # the ground truth, then the proposals at IoU >= 0.5
    deltas = encode_boxes(chosen, gt.expand(4, 4)).double()
    both = torch.cat((deltas, deltas * torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64)))
    cat = VOC_CLASSES.index("cat") + 1
    assert torch.allclose(stats.box_targets.means[cat], both.mean(0).float(), atol=1e-6)
    assert stats.box_targets.means[cat, 0] == pytest.approx(0.0, abs=1e-7)  # mirror images cancel dx
    expected_stds = both.std(0, unbiased=False).float()
    expected_stds[expected_stds <= 1e-12] = 1.0  # dy does not vary here: left at 1
    assert torch.allclose(stats.box_targets.stds[cat], expected_stds, atol=1e-6)
    assert (stats.box_targets.stds[1] == 1).all() and (stats.box_targets.means[1] == 0).all()  # no aeroplane
    fixed = training_regions(split, replace(config, box_normalisation="fixed")).box_targets
    assert fixed.stds[cat].tolist() == pytest.approx([0.1, 0.1, 0.2, 0.2]) and (fixed.means == 0).all()


def test_test_time_threshold_nms_and_at_most_100_per_image():
    config = DetectionConfig()
    # 3 proposals, classes 1 and 2: scores above / at / below 0.05.
    scores = torch.tensor([[0.0, 0.9, 0.05], [0.0, 0.8, 0.06], [0.0, 0.04, 0.7]])
    boxes = torch.tensor([[[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0]],
                          [[1.0, 0.0, 10.0, 9.0], [1.0, 0.0, 10.0, 9.0]],  # IoU 0.82 with the first
                          [[50.0, 50.0, 59.0, 59.0], [50.0, 50.0, 59.0, 59.0]]])
    found = detect_in_image(scores, boxes, config)
    # Class 1: 0.9 kept, 0.8 suppressed by it, 0.04 below the threshold. Class 2: 0.05 is not above
    # 0.05; 0.06 and 0.7 do not overlap, both kept (suppression is per class).
    assert found.labels.tolist() == [1, 2, 2]
    assert found.scores.tolist() == pytest.approx([0.9, 0.7, 0.06])
    assert found.boxes[0].tolist() == [1.0, 1.0, 10.0, 10.0]  # back to VOC's 1-based coordinates
    # 150 disjoint boxes of one class: the best 100 remain, and ties at the 100th score are kept.
    many = torch.zeros(150, 2)
    many[:, 1] = torch.linspace(0.9, 0.1, 150)
    many[100, 1] = many[99, 1]
    grid = torch.tensor([[20.0 * (i % 15), 20.0 * (i // 15), 20.0 * (i % 15) + 9, 20.0 * (i // 15) + 9]
                         for i in range(150)])
    assert len(detect_in_image(many, grid[:, None, :], config).scores) == 101


def test_sliding_windows_by_hand():
    # One 50 px square window on a 100 px image, step 25: starts 0, 25, 50 on both axes.
    config = DetectionConfig(window_sizes=(0.5,), window_ratios=(1.0,), window_stride=0.5)
    boxes = sliding_window_proposals(100, 100, config)
    starts = (0, 25, 50)
    expected = {(x, y, x + 49, y + 49) for x in starts for y in starts}
    assert {tuple(int(v) for v in box) for box in boxes.tolist()} == expected


def test_sliding_windows_cover_the_image_and_typical_objects():
    config = DetectionConfig()
    height, width = 128, 170
    boxes = sliding_window_proposals(height, width, config)
    assert boxes.dtype == torch.float32 and boxes.shape[1] == 4
    assert 100 < len(boxes) < 600  # cheap enough to score every window of every test image
    assert len(torch.unique(boxes, dim=0)) == len(boxes)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= width - 1).all() and (boxes[:, 3] <= height - 1).all()
    assert boxes[:, 0].min() == 0 and boxes[:, 2].max() == width - 1
    assert boxes[:, 1].min() == 0 and boxes[:, 3].max() == height - 1
    # Objects of the listed size range and shape, anywhere: nearly all have a window with
    # IoU >= 0.5, none is far from one (box regression corrects the rest).
    generator = torch.Generator().manual_seed(0)
    sides = (0.25 + 0.6 * torch.rand(500, generator=generator)) * height
    ratios = torch.exp((torch.rand(500, generator=generator) - 0.5) * 2 * math.log(2))  # 1/2 .. 2
    object_widths = (sides * ratios.sqrt()).clamp(max=width)
    object_heights = (sides / ratios.sqrt()).clamp(max=height)
    lefts = torch.rand(500, generator=generator) * (width - object_widths)
    tops = torch.rand(500, generator=generator) * (height - object_heights)
    objects = torch.stack((lefts, tops, lefts + object_widths - 1, tops + object_heights - 1), dim=1)
    best = box_iou(objects, boxes).max(dim=1).values
    assert (best >= 0.5).float().mean() >= 0.98
    assert best.min() >= 0.44


def test_box_encoding_by_hand():
    # A 10 px box moved right by half its width, twice as tall, centred 5 px lower.
    proposals = torch.tensor([[0.0, 0.0, 9.0, 9.0]])
    targets = torch.tensor([[5.0, 0.0, 14.0, 19.0]])
    assert encode_boxes(proposals, targets).tolist()[0] == pytest.approx([0.5, 0.5, 0.0, math.log(2)])


def test_box_encoding_round_trip_per_class():
    generator = torch.Generator().manual_seed(0)

    def random_boxes(count):
        corner = torch.rand(count, 2, generator=generator) * 100
        size = 5 + torch.rand(count, 2, generator=generator) * 60
        return torch.cat((corner, corner + size - 1), dim=1)

    proposals, targets = random_boxes(200), random_boxes(200)
    deltas = encode_boxes(proposals, targets)
    assert torch.allclose(decode_boxes(proposals, deltas), targets, atol=1e-3)
    per_class = torch.stack((deltas, torch.zeros_like(deltas)), dim=1)  # 200 x 2 classes x 4
    decoded = decode_boxes(proposals, per_class)
    assert torch.allclose(decoded[:, 0], targets, atol=1e-3) and torch.allclose(decoded[:, 1], proposals, atol=1e-4)
