"""The VOC 2007 detection transfer task on a tiny generated VOC2007 dataset in the real layout."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from itl_ray.datasets.voc import VOC_CLASSES, read_voc2007_detection
from itl_ray.models import AlexNet
from itl_ray.transfer.detection import (
    DetectionConfig,
    box_iou,
    decode_boxes,
    encode_boxes,
    evaluate_detection,
    sample_rois,
    sliding_window_proposals,
)

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
        image = Image.new("RGB", (width, height))
        image.putdata([tuple(rng.randint(90, 170) for _ in range(3)) for _ in range(width * height)])
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
