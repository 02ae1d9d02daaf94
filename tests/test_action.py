"""The VOC 2012 action stage (R*CNN's primary region; person crops as a setting) on small
constructed datasets whose actions are easy to see: each person is a rectangle whose colour is its
action. Trained, the network ranks every val person of an action above the others; untrained (a new
classifier, no step) it ranks them by chance. Also: R*CNN's recipe values, persons flagged only
``other``, images without persons, the per-person scores table reproducing the logged mAP, and
images read a few at a time."""

from __future__ import annotations

import io
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from itl_ray import metrics
from itl_ray.datasets.voc import ACTION_CLASSES, VocImage, VocObject, VocSplit, VocSplits
from itl_ray.errors import UserError
from itl_ray.models import AlexNet
from itl_ray.transfer.action import (OTHER, ActionConfig, ActionRuntime, CropsConfig, action_targets, evaluate_action, person_crops,
                                     softmax_labels, training_regions)
from itl_ray.transfer.image_stream import ImageStream

CPU = torch.device("cpu")
# The four actions present, by the colour of the person who does them; "other" persons are grey-blue.
COLOURS = {"jumping": (210, 40, 40), "phoning": (40, 70, 210), "reading": (40, 180, 60), "walking": (220, 200, 40)}
OTHER_COLOUR = (120, 120, 200)


def persons(count: int, seed: int, others: int = 0, empty: int = 0) -> VocSplit:
    """Images of 1-2 persons on grey noise, their actions in turn (PNG: exact pixels); ``others``
    more images of one person flagged only "other", ``empty`` images without persons."""
    rng = np.random.default_rng(seed)
    images, actions = [], list(COLOURS) * count
    for index in range(count + others + empty):
        width, height = int(rng.integers(72, 96)), int(rng.integers(64, 80))
        pixels = rng.integers(90, 170, (height, width, 3), dtype=np.uint8)
        objects = []
        slots = 0 if index >= count + others else 1 if index >= count else 1 + index % 2
        for slot in range(slots):
            action = actions.pop() if index < count else None
            box_width, box_height = int(rng.integers(16, width // 2 - 4)), int(rng.integers(28, height - 8))
            left = int(rng.integers(0, width // 2 - box_width)) + slot * (width // 2)
            top = int(rng.integers(0, height - box_height))
            pixels[top : top + box_height, left : left + box_width] = COLOURS[action] if action else OTHER_COLOUR
            box = (left + 1, top + 1, left + box_width, top + box_height)  # VOC: 1-based, inclusive
            objects.append(VocObject("person", box, actions=(action,) if action else ()))
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="PNG")
        images.append(VocImage(f"{seed}_{index:04d}", f"row {index}", width, height, tuple(objects),
                               encoded.getvalue()))
    return VocSplit(f"actions {seed}", tuple(images))


def backbone() -> AlexNet:
    """A small untrained AlexNet with He initialisation (the demo's, sweeps/smoke.yaml): Caffe's
    Gaussians leave an untrained network's features nearly flat."""
    torch.manual_seed(0)
    return AlexNet(num_classes=10, width=0.125, resolution=48, init="kaiming")


# Small images at their size, a short schedule with a larger rate: what this tiny set needs.
EASY = dict(image_size=64, max_size=96, iterations=240, lr_step=200, lr=0.003)


def test_defaults_are_rstar_cnns_primary_region_recipe():
    config = ActionConfig()
    assert (config.model, config.head) == ("rstar_primary", "softmax")
    assert (config.image_size, config.max_size) == (600, 1000)  # config.py TRAIN.SCALES, MAX_SIZE
    assert (config.iterations, config.lr_step, config.lr) == (40000, 30000, 0.0001)  # README; solver.prototxt
    assert (config.momentum, config.weight_decay) == (0.9, 0.0005)
    assert (config.images_per_batch, config.flip_probability) == (2, 0.5)  # IMS_PER_BATCH, USE_FLIPPED
    assert (config.bias_lr_multiplier, config.bias_decay_multiplier, config.frozen_convs) == (2.0, 0.0, 1)
    assert config.roi_pool == "max" and config.epochs == 0 and config.conv_lr_scale == config.head_lr_scale == 1.0
    assert (config.regions, config.rois_per_batch, config.region_iou) == ("jitter", 30, 0.5)  # BATCH_SIZE, FG_THRESH


def test_jittered_training_regions_overlap_their_person_and_take_its_actions():
    boxes = torch.tensor([[10.0, 20.0, 59.0, 99.0], [120.0, 30.0, 149.0, 89.0]])  # 50 x 80 and 30 x 60 px
    targets = torch.zeros(2, 10)
    targets[0, 3], targets[1, 7] = 1.0, 1.0
    config = ActionConfig()
    generator = torch.Generator().manual_seed(0)
    regions, labels = training_regions(boxes, targets, 120, 160, config, generator)
    assert len(regions) == config.rois_per_batch // config.images_per_batch == 15  # 2 x 16 candidates, 15 kept
    overlap = metrics.box_iou(regions, boxes)
    best, owner = overlap.max(dim=1)
    assert (best >= 0.5).all() and (best < 1).any()  # boxes around the persons, not only the persons
    assert torch.equal(labels, targets[owner])  # each takes the actions of the person it overlaps most
    assert (regions[:, :2] >= 0).all() and (regions[:, 2] <= 159).all() and (regions[:, 3] <= 119).all()
    again, _ = training_regions(boxes, targets, 120, 160, config, torch.Generator().manual_seed(0))
    assert torch.equal(regions, again)  # drawn from the stage's generator only
    strict, _ = training_regions(boxes, targets, 120, 160, ActionConfig(region_iou=0.9), generator)
    assert (metrics.box_iou(strict, boxes).max(dim=1).values >= 0.9).all()
    given, given_labels = training_regions(boxes, targets, 120, 160, ActionConfig(regions="box"), generator)
    assert torch.equal(given, boxes) and torch.equal(given_labels, targets)
    none, no_labels = training_regions(torch.zeros(0, 4), torch.zeros(0, 10), 120, 160, config, generator)
    assert none.shape == (0, 4) and no_labels.shape == (0, 10)


def test_softmax_labels_take_the_first_action_or_other():
    targets = torch.tensor([[0.0] * 10, [0, 0, 1, 0, 0, 0, 0, 0, 0, 1], [1.0] + [0.0] * 9])
    assert softmax_labels(targets).tolist() == [OTHER, 2, 0]
    assert OTHER == 10 == len(ACTION_CLASSES)


@pytest.fixture(scope="module")
def trained():
    train = persons(24, seed=0, others=4, empty=2)
    val = persons(12, seed=1, others=3, empty=1)
    lines = []
    result = evaluate_action(backbone(), VocSplits(train, val), ActionConfig(**EASY), CPU, seed=0, log=lines.append)
    untrained = evaluate_action(backbone(), VocSplits(train, val), ActionConfig(**{**EASY, "iterations": 0}), CPU,
                                seed=0, log=lambda line: None)
    return {"result": result, "untrained": untrained, "lines": lines, "val": val}


def test_training_ranks_each_action_above_the_others(trained):
    result, untrained = trained["result"].metrics, trained["untrained"].metrics
    # Only the actions with val persons have an AP; the mean is over them.
    assert set(result) == {"voc12_act_map", *(f"voc12_act_ap/{action}" for action in COLOURS)}
    aps = [result[f"voc12_act_ap/{action}"] for action in COLOURS]
    assert result["voc12_act_map"] == pytest.approx(sum(aps) / len(aps))
    assert result["voc12_act_map"] > 95
    assert untrained["voc12_act_map"] < 75  # a random classifier ranks the four colours at random


def test_other_persons_are_negatives_for_every_action_and_empty_images_are_counted(trained):
    table = trained["result"].per_image["voc12_act_scores"]
    val = trained["val"]
    rows = table.to_pylist()
    # Every person of the val images is scored for every action, "other" persons included.
    people = [(image.image_id, number) for image in val.images for number, _ in enumerate(image.objects)]
    assert len(rows) == 10 * len(people) == 10 * (18 + 3)
    others = {image.image_id for image in val.images if image.objects and not image.objects[0].actions}
    assert len(others) == 3
    assert all(row["label"] == 0 for row in rows if row["image_id"] in others)
    assert any("1 of 16 actions 1 images have no person box: left out" in line for line in trained["lines"])


def test_scores_table_follows_the_contract_and_reproduces_the_logged_map(trained):
    table = trained["result"].per_image["voc12_act_scores"]
    assert [(field.name, str(field.type)) for field in table.schema] == [
        ("image_id", "string"), ("person", "int64"), ("action", "string"), ("score", "double"), ("label", "int64")]
    columns = table.to_pydict()
    aps = []
    for action in ACTION_CLASSES:
        chosen = [i for i, name in enumerate(columns["action"]) if name == action]
        aps.append(metrics.average_precision([columns["score"][i] for i in chosen],
                                             [columns["label"][i] for i in chosen], eleven_point=False))
    assert 100 * metrics.mean_ap(aps) == trained["result"].metrics["voc12_act_map"]  # exactly
    for action, ap in zip(ACTION_CLASSES, aps):
        if ap == ap:
            assert 100 * ap == trained["result"].metrics[f"voc12_act_ap/{action}"]


def test_same_seed_same_result_other_seed_other_result():
    train, val = persons(8, seed=0), persons(4, seed=1)
    config = ActionConfig(**{**EASY, "iterations": 20})
    runs = [evaluate_action(backbone(), VocSplits(train, val), config, CPU, seed=seed, log=lambda line: None)
            .per_image["voc12_act_scores"].column("score").to_pylist() for seed in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    # The number of decoding threads changes nothing.
    more = evaluate_action(backbone(), VocSplits(train, val), config, CPU, seed=3, log=lambda line: None,
                           runtime=ActionRuntime(workers=3))
    assert more.per_image["voc12_act_scores"].column("score").to_pylist() == runs[0]


def test_the_crops_model_stays_a_setting():
    train, val = persons(24, seed=0, others=2), persons(12, seed=1, others=2)
    crops = CropsConfig(epochs=12, batch_size=8, lr=0.01, lr_drop_every=10)
    result = evaluate_action(backbone(), VocSplits(train, val), ActionConfig(model="crops", crops=crops), CPU, seed=0,
                             log=lambda line: None)
    assert result.metrics["voc12_act_map"] > 95
    assert result.per_image["voc12_act_scores"].num_rows == 10 * (18 + 2)


def test_person_crops_are_the_boxes_with_their_actions():
    split = persons(6, seed=3, others=1)
    crops, targets = person_crops(list(split.images), split.encoded, 55, context=1.2)
    people = [person for image in split.images for person in image.objects]
    assert crops.shape == (len(people), 3, 55, 55) and crops.dtype == torch.uint8
    assert torch.equal(targets, torch.cat([action_targets(image) for image in split.images]))
    for crop, person in zip(crops, people):
        colour = COLOURS[person.actions[0]] if person.actions else OTHER_COLOUR
        assert crop[:, 27, 27].tolist() == list(colour)  # the middle of the crop is the person's colour


def test_a_split_without_persons_is_a_user_error():
    empty = persons(0, seed=0, empty=2)
    with pytest.raises(UserError, match="actions 0 split holds no annotated persons"):
        evaluate_action(backbone(), VocSplits(empty, persons(2, seed=1)), ActionConfig(**EASY), CPU, seed=0,
                        log=lambda line: None)


def test_config_errors_name_the_field():
    """Bounds and choices declared on the fields, checked by the config's one validator; the rule
    between fields by ActionConfig.check."""
    from itl_ray.config import validate

    assert validate(ActionConfig(), "transfer.action") == ActionConfig()
    for config, message in (
        (ActionConfig(model="context"), r"transfer\.action\.model='context' is not one of the choices: rstar_primary, crops"),
        (ActionConfig(head="ranking"), r"transfer\.action\.head='ranking' is not one of the choices: softmax, binary"),
        (ActionConfig(regions="proposals"), r"transfer\.action\.regions='proposals' is not one of the choices"),
        (ActionConfig(crops=CropsConfig(context=0.5)), r"transfer\.action\.crops\.context=0\.5 is out of range; allowed: >= 1"),
        (ActionConfig(region_iou=0.0), r"transfer\.action\.region_iou=0\.0 is out of range; allowed: > 0 and <= 1"),
        (ActionConfig(rois_per_batch=31), r"transfer\.action: rois_per_batch \(31\) must be a multiple of images_per_batch \(2\)"),
    ):
        with pytest.raises(UserError, match=message):
            validate(config, "transfer.action")


def test_images_are_read_a_few_at_a_time_however_large_the_split(monkeypatch):
    """The stage holds a bounded number of decoded images whatever the split's size: every image
    the reader decodes is tracked until it is freed; ten times the images, the same peak."""
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
    results = []
    for count in (8, 80):
        seen.update(decoded=0, peak=0)
        train, val = persons(count, seed=0), persons(count, seed=1)
        config = ActionConfig(**{**EASY, "epochs": 1})  # one pass over train, then every val image
        evaluate_action(backbone(), VocSplits(train, val), config, CPU, seed=0, log=lambda line: None,
                        runtime=ActionRuntime(workers=1))
        results.append(dict(seen))
    assert [result["decoded"] for result in results] == [8 + 8, 80 + 80]
    # Never more than the reader's look-ahead (4 with one worker) plus the batch in use (2).
    assert results[0]["peak"] <= 6 and results[1]["peak"] <= 6
