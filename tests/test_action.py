"""The VOC 2012 action stage on a small constructed dataset whose actions are easy to see: each
person is a rectangle whose colour is its action. Fine-tuned, the network ranks every val person of
an action above the others; with a new fc8 and no fine-tuning it ranks them by chance."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from itl_ray.datasets.voc import ACTION_CLASSES, VocImage, VocObject
from itl_ray.errors import UserError
from itl_ray.models import AlexNet
from itl_ray.transfer.action import ActionConfig, evaluate_action, person_crops

CPU = torch.device("cpu")
# The four actions present, by the colour of the person who does them.
COLOURS = {"jumping": (210, 40, 40), "phoning": (40, 70, 210), "reading": (40, 180, 60), "walking": (220, 200, 40)}


def persons(count: int, seed: int) -> list[VocImage]:
    """Images of 1-2 persons on grey noise, their actions in turn (PNG: exact pixels)."""
    rng = np.random.default_rng(seed)
    images, actions = [], list(COLOURS) * count
    for index in range(count):
        width, height = int(rng.integers(72, 96)), int(rng.integers(64, 80))
        pixels = rng.integers(90, 170, (height, width, 3), dtype=np.uint8)
        objects = []
        for slot in range(1 + index % 2):  # two persons side by side in every other image
            action = actions.pop()
            box_width, box_height = int(rng.integers(16, width // 2 - 4)), int(rng.integers(28, height - 8))
            left = int(rng.integers(0, width // 2 - box_width)) + slot * (width // 2)
            top = int(rng.integers(0, height - box_height))
            pixels[top : top + box_height, left : left + box_width] = COLOURS[action]
            box = (left + 1, top + 1, left + box_width, top + box_height)  # VOC: 1-based, inclusive
            objects.append(VocObject("person", box, actions=(action,)))
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="PNG")
        images.append(VocImage(f"{seed}_{index:04d}", f"row {index}", width, height, tuple(objects),
                               encoded.getvalue()))
    return images


def backbone() -> AlexNet:
    """A small untrained AlexNet with He initialisation (the demo's, sweeps/smoke.yaml): Caffe's
    Gaussians leave an untrained network's features nearly flat."""
    torch.manual_seed(0)
    return AlexNet(num_classes=10, width=0.125, resolution=48, init="kaiming")


def test_person_crops_are_the_boxes_with_their_actions():
    images = persons(6, seed=3)
    crops, targets = person_crops(images, 55, context=1.2)
    people = [person for image in images for person in image.objects]
    assert crops.shape == (len(people), 3, 55, 55) and crops.dtype == torch.uint8
    assert targets.shape == (len(people), len(ACTION_CLASSES))
    for crop, target, person in zip(crops, targets, people):
        assert target.tolist() == [1.0 if action in person.actions else 0.0 for action in ACTION_CLASSES]
        # The middle of the crop is the middle of the person: its colour, exactly.
        assert crop[:, 27, 27].tolist() == list(COLOURS[person.actions[0]])


def test_fine_tuning_ranks_each_action_above_the_others():
    train, val = persons(24, seed=0), persons(12, seed=1)
    config = ActionConfig(epochs=12, batch_size=8, lr=0.01, lr_drop_every=10)
    trained = evaluate_action(backbone(), train, val, config, CPU, seed=0, log=lambda line: None)
    untrained = evaluate_action(backbone(), train, val, ActionConfig(epochs=0), CPU, seed=0, log=lambda line: None)
    # Only the actions with val persons have an AP; the mean is over them.
    assert set(trained) == {"voc12_act_map", *(f"voc12_act_ap/{action}" for action in COLOURS)}
    aps = [trained[f"voc12_act_ap/{action}"] for action in COLOURS]
    assert trained["voc12_act_map"] == pytest.approx(sum(aps) / len(aps))
    assert trained["voc12_act_map"] == pytest.approx(100.0)
    assert untrained["voc12_act_map"] < 75  # a random fc8 ranks the four colours at random: about 55


def test_a_split_without_persons_is_a_user_error():
    empty = [VocImage("0001", "row 0", 64, 64, (), b"")]
    with pytest.raises(UserError, match="holds no annotated persons"):
        evaluate_action(backbone(), empty, persons(2, seed=0), ActionConfig(epochs=1), CPU, seed=0)
