"""The embedded mini-benchmark: a small generated ImageNet, VOC 2007, VOC 2012 actions and SUN397,
written in the real on-disk formats so the same readers load it as load the real data.

How images look. Every WordNet synset has a look built from its ancestors: the ancestor at depth
6 of its chain of parents picks the silhouette, depth 7 the fill colour, depth 9 the pattern kind
and its second colour, depth 11 the pattern's angle and period, and the synset itself an outline
colour and a spot position (a synset shallower than a depth uses itself). Classes that share
ancestors therefore share traits: merging them into an ancestor (a coarse label set) stays
learnable but loses the fine distinctions, as in the study.

Why pretraining pays. VOC objects are drawn with the look of the mini ImageNet classes that
overlap the VOC class by the study's rule (``label_sets.pascal_overlap``: a VOC "dog" is one of
the dog breeds), which are exactly the classes ``pascal_removed`` removes; a VOC class that no
mini class overlaps (cow, person, potted plant, train, TV monitor) is drawn with the look of its
own synset. Actions are marked by the object a person
holds or rides (a guitar, a horse, a laptop), and a SUN scene is the pair of objects that tends to
be in it; backgrounds and clutter are random. Features learned on the mini ImageNet recognise all
of these, so a pretrained network beats random initialisation on all three transfer tasks.

Everything is seeded: the same seed writes byte-identical files.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from itl_ray import wordnet
from itl_ray.datasets.voc import ACTION_CLASSES, VOC_CLASSES, parse_annotation
from itl_ray.errors import UserError
from itl_ray.label_sets import PASCAL_VOC_SYNSETS, pascal_overlap

# 2: VOC objects follow PASCAL_VOC_SYNSETS (potted plants and TV monitors drawn as plant.n.02 and
# monitor.n.05, no longer as the pot and television_receiver synsets); scenes draw from that pool.
FORMAT_VERSION = 2

# 40 real ILSVRC-2012 classes: several under most PASCAL VOC classes (so the pascal_removed and
# hierarchy experiments mean something here), the objects that mark the actions, and a fruit.
MINI_CLASSES = (
    "n02085620", "n02088364", "n02099601", "n02106662",  # Chihuahua, beagle, golden retriever, German shepherd
    "n02123045", "n02123159", "n02124075",  # tabby, tiger cat, Egyptian cat
    "n01530575", "n01531178", "n01614925",  # brambling, goldfinch, bald eagle
    "n02389026", "n02412080", "n02403003",  # sorrel, ram, ox
    "n02814533", "n02930766", "n04285008",  # beach wagon, cab, sports car
    "n04146614", "n04487081",  # school bus, trolleybus
    "n03792782", "n03785016",  # mountain bike, moped
    "n02690373", "n03095699", "n02951358", "n03272562",  # airliner, container ship, canoe, electric locomotive
    "n02823428", "n04591713",  # beer bottle, wine bottle
    "n04099969", "n03376595", "n04344873", "n03201208",  # rocking chair, folding chair, studio couch, dining table
    "n04404412", "n03991062",  # television, pot (flowerpot)
    "n02992529", "n02676566", "n03642806", "n04069434",  # cellular telephone, acoustic guitar, laptop, reflex camera
    "n04120489", "n02769748", "n02802426", "n07747607",  # running shoe, backpack, basketball, orange
)

# The object that marks each VOC 2012 action.
ACTION_OBJECTS = {
    "jumping": "n02802426",  # basketball
    "phoning": "n02992529",  # cellular telephone
    "playinginstrument": "n02676566",  # acoustic guitar
    "reading": "n02870526",  # book
    "ridingbike": "n02834778",  # bicycle
    "ridinghorse": "n02374451",  # horse
    "running": "n04120489",  # running shoe
    "takingphoto": "n04069434",  # reflex camera
    "usingcomputer": "n03642806",  # laptop
    "walking": "n02769748",  # backpack
}

# 24 real SUN397 scene categories (their paths in the release).
SUN_SCENES = (
    "/a/abbey", "/a/airport_terminal", "/b/bakery/shop", "/b/bathroom", "/b/beach", "/b/bedroom",
    "/b/bookstore", "/c/campsite", "/c/classroom", "/c/coast", "/c/corridor", "/d/dining_room",
    "/f/forest_path", "/g/garage/indoor", "/h/highway", "/k/kitchen", "/l/living_room",
    "/m/mountain", "/o/office", "/p/parking_lot", "/p/playground", "/r/restaurant", "/s/street",
    "/s/stadium/football",
)


@dataclass(frozen=True)
class Sizes:
    """How many images of each kind the benchmark holds. The defaults are the demo's (8,860
    images, about 41 MB); tests use smaller ones."""

    train_per_class: int = 150
    val_per_class: int = 25
    voc07_trainval: int = 250
    voc07_test: int = 250
    voc12_train: int = 200
    voc12_val: int = 200
    sun_per_scene: int = 40  # each partition: half training, half testing


# ---------------------------------------------------------------------------------------------
# Looks: traits derived from a synset's ancestors
# ---------------------------------------------------------------------------------------------

SILHOUETTES = ("ellipse", "rectangle", "triangle", "diamond", "hexagon", "cross", "halfdisc", "star")
PATTERNS = ("stripes", "checker", "dots", "rings")
OUTLINE_COLOURS = (
    (255, 255, 255), (20, 20, 20), (230, 40, 40), (40, 200, 60),
    (50, 90, 240), (250, 220, 30), (240, 60, 230), (40, 220, 230),
)
SPOT_POSITIONS = ((0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7))
TRAIT_DEPTHS = {"silhouette": 6, "fill": 7, "pattern": 9, "geometry": 11}


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from its parts (stable across processes and machines)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class Look:
    """How every drawn instance of one synset looks (``render_object`` adds per-instance jitter)."""

    silhouette: int  # index into SILHOUETTES
    fill_hue: float  # HSV hue in [0, 1)
    pattern: int  # index into PATTERNS
    pattern_hue: float  # HSV hue in [0, 1) of the pattern's second colour
    angle: float  # radians, in [0, pi)
    period: float  # in units of the object's size, in [0.18, 0.40)
    outline: int  # index into OUTLINE_COLOURS
    spot: int  # index into SPOT_POSITIONS


def look_of(wnid: str, seed: int) -> Look:
    """The look of synset ``wnid`` under ``seed``: each trait hashed from the ancestor at its depth
    of ``TRAIT_DEPTHS`` on the synset's parent chain (the synset itself when it is shallower),
    outline and spot from the synset alone (see the module docstring). Deterministic: the same
    (wnid, seed) gives the same look in every process. Raises UserError for a wnid that is not a
    WordNet 3.0 noun, or when WordNet is not installed."""
    chain = wordnet.ancestry(wnid)

    def at(depth: int) -> str:
        return chain[min(depth, len(chain) - 1)]

    s, f, p, g = (at(TRAIT_DEPTHS[name]) for name in ("silhouette", "fill", "pattern", "geometry"))
    return Look(
        silhouette=int(_unit(seed, s, "silhouette") * len(SILHOUETTES)),
        fill_hue=_unit(seed, f, "fill"),
        pattern=int(_unit(seed, p, "pattern") * len(PATTERNS)),
        pattern_hue=_unit(seed, p, "pattern_hue"),
        angle=_unit(seed, g, "angle") * np.pi,
        period=0.18 + 0.22 * _unit(seed, g, "period"),
        outline=int(_unit(seed, wnid, "outline") * len(OUTLINE_COLOURS)),
        spot=int(_unit(seed, wnid, "spot") * len(SPOT_POSITIONS)),
    )


def _rgb(hue: float, saturation: float = 0.75, value: float = 0.85) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, saturation, value), dtype=np.float32) * 255


def _silhouette_points(kind: str, width: int, height: int) -> list[tuple[float, float]] | None:
    """Polygon of a silhouette in a width x height box (None: drawn as an ellipse or half disc)."""
    def scale(points):
        return [(x * (width - 1), y * (height - 1)) for x, y in points]

    if kind == "rectangle":
        return scale([(0.05, 0.1), (0.95, 0.1), (0.95, 0.9), (0.05, 0.9)])
    if kind == "triangle":
        return scale([(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)])
    if kind == "diamond":
        return scale([(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)])
    if kind == "hexagon":
        return scale([(0.25, 0.0), (0.75, 0.0), (1.0, 0.5), (0.75, 1.0), (0.25, 1.0), (0.0, 0.5)])
    if kind == "cross":
        a, b = 0.3, 0.7
        return scale([(a, 0), (b, 0), (b, a), (1, a), (1, b), (b, b), (b, 1), (a, 1), (a, b), (0, b), (0, a), (a, a)])
    if kind == "star":
        angles = np.arange(16) * np.pi / 8
        radii = np.where(np.arange(16) % 2 == 0, 0.5, 0.3)
        return scale(list(zip(0.5 + radii * np.cos(angles), 0.5 + radii * np.sin(angles))))
    return None


def render_object(look: Look, width: int, height: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An object's pixels (height x width x 3 float32, 0-255) and its mask (height x width bool),
    with per-instance jitter of the pattern's angle, period and phase and of the colours, drawn
    from ``rng``."""
    mask_image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask_image)
    kind = SILHOUETTES[look.silhouette]
    points = _silhouette_points(kind, width, height)
    if points is not None:
        draw.polygon(points, fill=255)
    elif kind == "ellipse":
        draw.ellipse((0, 0, width - 1, height - 1), fill=255)
    else:  # half disc
        draw.pieslice((0, 0, width - 1, 2 * height - 1), 180, 360, fill=255)
    mask = np.asarray(mask_image) > 0

    size = max(width, height)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = look.angle + rng.normal(0, 0.08)
    period = max(3.0, look.period * size * rng.uniform(0.9, 1.1))
    u = (xs * np.cos(angle) + ys * np.sin(angle)) / period
    v = (-xs * np.sin(angle) + ys * np.cos(angle)) / period
    phase = rng.uniform(0, 1)
    pattern = PATTERNS[look.pattern]
    if pattern == "stripes":
        on = np.sin(2 * np.pi * (u + phase)) > 0
    elif pattern == "checker":
        on = (np.floor(u + phase) + np.floor(v + phase)) % 2 == 0
    elif pattern == "dots":
        on = (np.sin(2 * np.pi * (u + phase)) * np.sin(2 * np.pi * (v + phase))) > 0.35
    else:  # rings around the centre
        radius = np.hypot(xs - width / 2, ys - height / 2) / period
        on = np.sin(2 * np.pi * (radius + phase)) > 0
    jitter = rng.normal(0, 0.02)
    brightness = rng.uniform(0.8, 1.1)
    fill = _rgb(look.fill_hue + jitter) * brightness
    second = _rgb(look.pattern_hue + jitter, 0.6, 0.95) * brightness
    pixels = np.where(on[..., None], second, fill).astype(np.float32)

    # The synset's own marks: an outline and a spot, both in its outline colour.
    outline_image = Image.new("L", (width, height), 0)
    outline_draw = ImageDraw.Draw(outline_image)
    thickness = max(2, size // 14)
    if points is not None:
        outline_draw.line(points + [points[0]], fill=255, width=thickness)
    elif kind == "ellipse":
        outline_draw.ellipse((0, 0, width - 1, height - 1), outline=255, width=thickness)
    else:
        outline_draw.pieslice((0, 0, width - 1, 2 * height - 1), 180, 360, outline=255, width=thickness)
    sx, sy = SPOT_POSITIONS[look.spot]
    radius = max(2, size // 8)
    cx, cy = sx * width, (0.25 + 0.6 * sy) * height if kind == "halfdisc" else sy * height
    outline_draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    marks = (np.asarray(outline_image) > 0) & mask
    pixels[marks] = np.array(OUTLINE_COLOURS[look.outline], dtype=np.float32)
    return pixels, mask


def background(width: int, height: int, rng: np.random.Generator, clutter: int) -> np.ndarray:
    """A random smooth colour field plus ``clutter`` plain random shapes (clutter carries no
    class): height x width x 3 float32, 0-255."""
    coarse = rng.uniform(40, 215, size=(3, 3, 3)).astype(np.uint8)
    canvas = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.float32)
    canvas = canvas + rng.normal(0, 6, size=canvas.shape)
    image = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(clutter):
        w, h = (int(rng.uniform(0.08, 0.22) * min(width, height)) for _ in range(2))
        x, y = int(rng.uniform(0, width - w)), int(rng.uniform(0, height - h))
        colour = tuple(int(c) for c in rng.uniform(0, 255, size=3))
        if rng.uniform() < 0.5:
            draw.ellipse((x, y, x + w, y + h), fill=colour)
        else:
            draw.rectangle((x, y, x + w, y + h), fill=colour)
    return np.asarray(image, dtype=np.float32).copy()


def paste(canvas: np.ndarray, look: Look, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    """Draw an object with ``look`` into canvas; box = (x0, y0, x1, y1), exclusive ends, may cross edges."""
    x0, y0, x1, y1 = box
    pixels, mask = render_object(look, x1 - x0, y1 - y0, rng)
    height, width = canvas.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    region = canvas[cy0:cy1, cx0:cx1]
    sub_mask = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    region[sub_mask] = pixels[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0][sub_mask]


def encode(canvas: np.ndarray, rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    """A canvas (HxWx3 float, 0-255) with Gaussian noise of std 4 added, clipped to uint8 and
    encoded as ``fmt`` (JPEG at quality 90): the file's bytes."""
    noisy = canvas + rng.normal(0, 4, size=canvas.shape)
    buffer = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buffer, format=fmt, quality=90)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The four datasets. Each job renders one image from (seed, name) alone, so jobs run in any
# process and order with identical results.
# ---------------------------------------------------------------------------------------------

# Looks and VOC instance synsets are computed once in the parent process (they need WordNet) and
# handed to each worker by ``_init_worker``.
_LOOKS: dict[str, Look] = {}
_INSTANCES: dict[str, list[str]] = {}


def _init_worker(looks: dict[str, Look], instances: dict[str, list[str]]) -> None:
    _LOOKS.update(looks)
    _INSTANCES.update(instances)


def _rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(int(_unit(seed, *parts) * 2**63))


def _imagenet_image(seed: int, wnid: str, name: str) -> bytes:
    rng = _rng(seed, "imagenet", name)
    width, height = int(rng.choice([80, 88, 96, 104])), int(rng.choice([80, 88, 96]))
    canvas = background(width, height, rng, clutter=int(rng.integers(1, 4)))
    side = int(min(width, height) * rng.uniform(0.55, 0.85))
    obj_w, obj_h = int(side * rng.uniform(0.85, 1.15)), int(side * rng.uniform(0.85, 1.15))
    x0 = int(rng.uniform(0, max(1, width - obj_w)))
    y0 = int(rng.uniform(0, max(1, height - obj_h)))
    paste(canvas, _LOOKS[wnid], (x0, y0, x0 + obj_w, y0 + obj_h), rng)
    return encode(canvas, rng)


def instance_synsets() -> dict[str, list[str]]:
    """For each VOC class, the synsets its objects are drawn as (one chosen at random per
    object): the mini ImageNet classes that overlap it (``label_sets.pascal_overlap``, the rule
    of ``pascal_removed``), or its own synsets (``PASCAL_VOC_SYNSETS``) when none does."""
    overlap = pascal_overlap(MINI_CLASSES)
    return {voc_class: overlap[voc_class] or list(PASCAL_VOC_SYNSETS[voc_class]) for voc_class in VOC_CLASSES}


def scene_pool() -> list[str]:
    """Every synset whose look the benchmark draws as an object (the mini classes and the VOC
    classes' own synsets), sorted: scenes take their objects and clutter from it."""
    own = {synset for synsets in PASCAL_VOC_SYNSETS.values() for synset in synsets}
    return sorted(set(MINI_CLASSES) | own)


def _place(rng: np.random.Generator, width: int, height: int, low: float, high: float) -> tuple[int, int, int, int]:
    side = rng.uniform(low, high) * min(width, height)
    w, h = int(side * rng.uniform(0.8, 1.25)), int(side * rng.uniform(0.8, 1.25))
    x0 = int(rng.uniform(-0.15 * w, width - 0.85 * w))
    y0 = int(rng.uniform(-0.15 * h, height - 0.85 * h))
    return x0, y0, x0 + w, y0 + h


def _voc_box(box, width, height) -> tuple[tuple[int, int, int, int], bool]:
    """Clip a drawn box to the image; VOC boxes are 1-based and inclusive. Also: truncated?"""
    x0, y0, x1, y1 = box
    clipped = (max(x0, 0) + 1, max(y0, 0) + 1, min(x1, width), min(y1, height))
    return clipped, clipped != (x0 + 1, y0 + 1, x1, y1)


def _voc07_image(seed: int, image_id: str) -> tuple[bytes, dict]:
    rng = _rng(seed, "voc07", image_id)
    width, height = int(rng.integers(128, 161)), int(rng.integers(112, 145))
    canvas = background(width, height, rng, clutter=int(rng.integers(1, 4)))
    objects = []
    for _ in range(int(rng.integers(1, 3))):
        voc_class = VOC_CLASSES[int(rng.integers(len(VOC_CLASSES)))]
        synsets = _INSTANCES[voc_class]
        look = _LOOKS[synsets[int(rng.integers(len(synsets)))]]
        box = _place(rng, width, height, 0.3, 0.65)
        paste(canvas, look, box, rng)
        clipped, truncated = _voc_box(box, width, height)
        small = min(clipped[2] - clipped[0], clipped[3] - clipped[1]) < 26
        objects.append({"name": voc_class, "box": clipped, "truncated": truncated, "difficult": small})
    return encode(canvas, rng), {"width": width, "height": height, "objects": objects}


def _voc12_image(seed: int, image_id: str) -> tuple[bytes, dict]:
    rng = _rng(seed, "voc12", image_id)
    width, height = int(rng.integers(128, 161)), int(rng.integers(112, 145))
    canvas = background(width, height, rng, clutter=int(rng.integers(2, 5)))
    (person_synset,) = PASCAL_VOC_SYNSETS["person"]
    person = _LOOKS[person_synset]
    objects = []
    for index in range(int(rng.integers(1, 3))):
        action = ACTION_CLASSES[int(rng.integers(len(ACTION_CLASSES)))]
        box_h = int(rng.uniform(0.5, 0.8) * height)
        box_w = int(box_h * rng.uniform(0.45, 0.65))
        slot = width // 2
        x0 = int(index * slot + rng.uniform(0, max(1, slot - box_w))) if index else int(rng.uniform(0, width - box_w))
        y0 = int(rng.uniform(0, height - box_h))
        paste(canvas, person, (x0, y0, x0 + box_w, y0 + box_h), rng)
        # The action's object, held or ridden, inside the person's box.
        side = int(box_w * rng.uniform(0.6, 0.85))
        ox = x0 + int(rng.uniform(0, max(1, box_w - side)))
        oy = y0 + int(rng.uniform(0.3, 0.65) * box_h)
        paste(canvas, _LOOKS[ACTION_OBJECTS[action]], (ox, oy, ox + side, oy + side), rng)
        box, truncated = _voc_box((x0, y0, x0 + box_w, y0 + box_h), width, height)
        objects.append({"name": "person", "box": box, "truncated": truncated, "difficult": False, "actions": [action]})
    return encode(canvas, rng), {"width": width, "height": height, "objects": objects}


def _voc07_photo_image(seed: int, image_id: str, width: int, height: int) -> tuple[bytes, dict]:
    """A VOC-2007-sized image for benchmarks: a cluttered background and 1 to 6 objects whose
    shorter side is drawn log-uniformly from 16 px to the image's shorter side (every size bin of
    the proposal recall report is populated), aspect ratios 1:2 to 2:1, wholly inside the image;
    larger objects are drawn first so small ones stay visible. No object is difficult."""
    rng = _rng(seed, "voc07-photo", image_id)
    canvas = background(width, height, rng, clutter=int(rng.integers(4, 13)))
    drawn = []
    for _ in range(int(rng.integers(1, 7))):
        voc_class = VOC_CLASSES[int(rng.integers(len(VOC_CLASSES)))]
        synsets = _INSTANCES[voc_class]
        look = _LOOKS[synsets[int(rng.integers(len(synsets)))]]
        short = float(np.exp(rng.uniform(np.log(16), np.log(min(width, height)))))
        long = min(short * rng.uniform(1.0, 2.0), float(max(width, height)))
        w, h = (long, short) if rng.uniform() < 0.5 else (short, long)
        w, h = int(min(max(w, 16), width)), int(min(max(h, 16), height))
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        drawn.append((w * h, voc_class, look, (x0, y0, x0 + w, y0 + h)))
    objects = []
    for _, voc_class, look, box in sorted(drawn, key=lambda entry: -entry[0]):
        paste(canvas, look, box, rng)
        clipped, truncated = _voc_box(box, width, height)
        objects.append({"name": voc_class, "box": clipped, "truncated": truncated, "difficult": False})
    return encode(canvas, rng), {"width": width, "height": height, "objects": objects}


def _scene_objects(seed: int) -> dict[str, list[str]]:
    """Each scene's two characteristic objects, drawn without replacement from the pool."""
    pool = scene_pool()
    order = sorted(pool, key=lambda wnid: _unit(seed, "scene-pool", wnid))
    return {scene: order[2 * index : 2 * index + 2] for index, scene in enumerate(SUN_SCENES)}


def _sun_image(seed: int, scene: str, name: str) -> bytes:
    rng = _rng(seed, "sun", name)
    width, height = int(rng.choice([96, 112, 128])), int(rng.choice([96, 112]))
    canvas = background(width, height, rng, clutter=int(rng.integers(1, 4)))
    own = _scene_objects(seed)[scene]
    pool = scene_pool()
    for _ in range(int(rng.integers(3, 6))):
        wnid = own[int(rng.integers(len(own)))] if rng.uniform() < 0.75 else pool[int(rng.integers(len(pool)))]
        paste(canvas, _LOOKS[wnid], _place(rng, width, height, 0.25, 0.45), rng)
    return encode(canvas, rng)


def _voc_xml(folder: str, image_id: str, info: dict) -> str:
    lines = [
        "<annotation>",
        f"\t<folder>{folder}</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>",
        "\t\t<database>itl_ray mini-benchmark</database>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{info['width']}</width>",
        f"\t\t<height>{info['height']}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>0</segmented>",
    ]
    for obj in info["objects"]:
        xmin, ymin, xmax, ymax = obj["box"]
        lines += [
            "\t<object>",
            f"\t\t<name>{obj['name']}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(obj['truncated'])}</truncated>",
            f"\t\t<difficult>{int(obj['difficult'])}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
        ]
        if "actions" in obj:
            lines.append("\t\t<actions>")
            lines += [f"\t\t\t<{a}>{int(a in obj['actions'])}</{a}>" for a in ACTION_CLASSES]
            lines.append("\t\t</actions>")
        lines.append("\t</object>")
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)


# Jobs: plain tuples so they pickle into worker processes.

def _job_imagenet(args) -> int:
    seed, root, split, wnid, index = args
    name = f"{wnid}_{index}.JPEG" if split == "train" else f"ILSVRC2012_val_{index:08d}.JPEG"
    _write(Path(root) / split / wnid / name, _imagenet_image(seed, wnid, f"{split}/{name}"))
    return 1


def _job_voc(args) -> int:
    seed, root, year, image_id = args
    make = _voc07_image if year == "2007" else _voc12_image
    data, info = make(seed, image_id)
    base = Path(root) / f"VOC{year}"
    _write(base / "JPEGImages" / f"{image_id}.jpg", data)
    _write(base / "Annotations" / f"{image_id}.xml", _voc_xml(f"VOC{year}", image_id, info))
    return 1


def _job_voc07_photo(args) -> int:
    seed, root, image_id, width, height = args
    data, info = _voc07_photo_image(seed, image_id, width, height)
    base = Path(root) / "VOC2007"
    _write(base / "JPEGImages" / f"{image_id}.jpg", data)
    _write(base / "Annotations" / f"{image_id}.xml", _voc_xml("VOC2007", image_id, info))
    return 1


def _job_sun(args) -> int:
    seed, root, scene, index = args
    name = _sun_file_name(seed, scene, index)
    _write(Path(root) / name.lstrip("/"), _sun_image(seed, scene, name))
    return 1


def _sun_file_name(seed: int, scene: str, index: int) -> str:
    return f"{scene}/sun_{hashlib.sha1(f'{seed}{scene}{index}'.encode()).hexdigest()[:16]}.jpg"


def _image_sets(staging: Path, seed: int, sizes: Sizes) -> list[tuple]:
    """Write the split lists and return the render jobs."""
    jobs: list[tuple] = []
    imagenet = staging / "ILSVRC2012"
    val_index = 1
    for wnid in MINI_CLASSES:
        jobs += [(_job_imagenet, (seed, str(imagenet), "train", wnid, i)) for i in range(1, sizes.train_per_class + 1)]
        for _ in range(sizes.val_per_class):
            jobs.append((_job_imagenet, (seed, str(imagenet), "val", wnid, val_index)))
            val_index += 1

    devkit = staging / "VOCdevkit"
    ids07 = [f"{i:06d}" for i in range(1, sizes.voc07_trainval + sizes.voc07_test + 1)]
    trainval, test = ids07[: sizes.voc07_trainval], ids07[sizes.voc07_trainval :]
    main = devkit / "VOC2007" / "ImageSets" / "Main"
    _write(main / "trainval.txt", "".join(f"{i}\n" for i in trainval))
    _write(main / "train.txt", "".join(f"{i}\n" for i in trainval[::2]))
    _write(main / "val.txt", "".join(f"{i}\n" for i in trainval[1::2]))
    _write(main / "test.txt", "".join(f"{i}\n" for i in test))
    jobs += [(_job_voc, (seed, str(devkit), "2007", i)) for i in ids07]

    ids12 = [f"2012_{i:06d}" for i in range(1, sizes.voc12_train + sizes.voc12_val + 1)]
    train12, val12 = ids12[: sizes.voc12_train], ids12[sizes.voc12_train :]
    action_dir = devkit / "VOC2012" / "ImageSets" / "Action"
    _write(action_dir / "train.txt", "".join(f"{i}\n" for i in train12))
    _write(action_dir / "val.txt", "".join(f"{i}\n" for i in val12))
    _write(action_dir / "trainval.txt", "".join(f"{i}\n" for i in ids12))
    jobs += [(_job_voc, (seed, str(devkit), "2012", i)) for i in ids12]

    sun = staging / "SUN397"
    partitions = sun / "Partitions"
    _write(partitions / "ClassName.txt", "".join(f"{scene}\n" for scene in SUN_SCENES))
    half = sizes.sun_per_scene // 2
    for number in range(1, 11):
        training, testing = [], []
        for scene in SUN_SCENES:
            order = sorted(range(sizes.sun_per_scene), key=lambda i: _unit(seed, "partition", number, scene, i))
            training += [_sun_file_name(seed, scene, i) for i in sorted(order[:half])]
            testing += [_sun_file_name(seed, scene, i) for i in sorted(order[half:])]
        _write(partitions / f"Training_{number:02d}.txt", "".join(f"{p}\n" for p in training))
        _write(partitions / f"Testing_{number:02d}.txt", "".join(f"{p}\n" for p in testing))
    jobs += [(_job_sun, (seed, str(sun), scene, i)) for scene in SUN_SCENES for i in range(sizes.sun_per_scene)]
    return jobs


def _run(job) -> int:
    function, args = job
    return function(args)


def write_action_image_sets(devkit: Path, split_ids: dict[str, list[str]]) -> None:
    """The per-action lists of VOC 2012 (``<action>_<split>.txt``: image id, person index, +-1)."""
    for split, ids in split_ids.items():
        base = devkit / "VOC2012"
        rows = {action: [] for action in ACTION_CLASSES}
        for image_id in ids:
            xml_path = base / "Annotations" / f"{image_id}.xml"
            image = parse_annotation(xml_path.read_bytes(), str(xml_path), "JPEGImages")
            for person_index, obj in enumerate(image.objects, start=1):
                for action in ACTION_CLASSES:
                    rows[action].append(f"{image_id} {person_index} {1 if action in obj.actions else -1:2d}\n")
        for action, lines in rows.items():
            _write(base / "ImageSets" / "Action" / f"{action}_{split}.txt", "".join(lines))


def synthesize(out_dir: str | Path, seed: int = 0, sizes: Sizes = Sizes(), workers: int | None = None,
               progress=None) -> Path:
    """Write the mini-benchmark under ``out_dir`` (atomically: a staging folder renamed at the end).

    Returns ``out_dir`` (absolute). An existing complete benchmark with the same seed, sizes and
    format version is kept as it is. ``workers`` processes render the images (default: all
    cores); ``progress(done, total)`` is called every 500 images and at the end. Raises UserError
    when ``out_dir`` holds another benchmark or other files, or when WordNet is missing.
    """
    out = Path(out_dir).expanduser().resolve()
    stamp = {"format_version": FORMAT_VERSION, "seed": seed, "sizes": sizes.__dict__}
    info_file = out / "SYNTH_INFO.json"
    if info_file.is_file():
        if json.loads(info_file.read_text()) == stamp:
            return out
        raise UserError(f"{out} already holds a mini-benchmark made with other settings; choose another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; choose an empty or new folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not an itl_ray mini-benchmark; choose an empty or new folder")
    wordnet.load()  # fail early, with the install hint, when WordNet is missing
    needed = sorted(set(scene_pool()) | set(ACTION_OBJECTS.values()))
    looks = {wnid: look_of(wnid, seed) for wnid in needed}
    instances = instance_synsets()
    staging = _staging_folder(out)
    try:
        jobs = _image_sets(staging, seed, sizes)
        workers = workers or os.cpu_count() or 1
        done = 0
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(looks, instances)) as pool:
            for count in pool.map(_run, jobs, chunksize=64):
                done += count
                if progress and (done % 500 == 0 or done == len(jobs)):
                    progress(done, len(jobs))
        ids12 = {
            split: (staging / "VOCdevkit" / "VOC2012" / "ImageSets" / "Action" / f"{split}.txt").read_text().split()
            for split in ("train", "val")
        }
        write_action_image_sets(staging / "VOCdevkit", ids12)
        for action in ACTION_CLASSES:
            action_dir = staging / "VOCdevkit" / "VOC2012" / "ImageSets" / "Action"
            train = (action_dir / f"{action}_train.txt").read_text()
            val = (action_dir / f"{action}_val.txt").read_text()
            _write(action_dir / f"{action}_trainval.txt", train + val)
        (staging / "SYNTH_INFO.json").write_text(json.dumps(stamp, indent=1) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def synthesize_voc2007(out_dir: str | Path, trainval: int, test: int, seed: int = 0,
                       size: tuple[int, int] = (500, 375), workers: int | None = None, progress=None) -> Path:
    """Write a generated VOC 2007 detection set at real VOC scale under ``out_dir``:
    ``VOCdevkit/VOC2007`` with ``trainval`` + ``test`` images of ``size`` (width, height) px
    (VOC 2007 has 5,011 + 4,952 images, most 500 x 375), each with 1 to 6 objects of every size
    from 16 px to the whole image (``_voc07_photo_image``). For benchmarks of proposals and
    detection at the real data's scale; the mini-benchmark is ``synthesize``.

    Returns ``out_dir`` (absolute); an existing set with the same settings is kept. Written into a
    staging folder renamed at the end. ``progress(done, total)`` is called every 100 images.
    Raises UserError when ``out_dir`` holds something else, or when WordNet is missing."""
    out = Path(out_dir).expanduser().resolve()
    stamp = {"format_version": FORMAT_VERSION, "kind": "voc2007-photo", "seed": seed, "trainval": trainval,
             "test": test, "size": list(size)}
    info_file = out / "SYNTH_INFO.json"
    if info_file.is_file():
        if json.loads(info_file.read_text()) == stamp:
            return out
        raise UserError(f"{out} already holds a generated set made with other settings; choose another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a folder; choose an empty or new folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not an itl_ray generated set; choose an empty or new folder")
    wordnet.load()
    instances = instance_synsets()
    looks = {wnid: look_of(wnid, seed) for wnid in sorted({w for synsets in instances.values() for w in synsets})}
    staging = _staging_folder(out)
    try:
        devkit = staging / "VOCdevkit"
        ids = [f"{i:06d}" for i in range(1, trainval + test + 1)]
        main = devkit / "VOC2007" / "ImageSets" / "Main"
        _write(main / "trainval.txt", "".join(f"{i}\n" for i in ids[:trainval]))
        _write(main / "test.txt", "".join(f"{i}\n" for i in ids[trainval:]))
        jobs = [(_job_voc07_photo, (seed, str(devkit), image_id, size[0], size[1])) for image_id in ids]
        done = 0
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1, initializer=_init_worker,
                                 initargs=(looks, instances)) as pool:
            for count in pool.map(_run, jobs, chunksize=16):
                done += count
                if progress and (done % 100 == 0 or done == len(jobs)):
                    progress(done, len(jobs))
        (staging / "SYNTH_INFO.json").write_text(json.dumps(stamp, indent=1) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def dataset_paths(out_dir: str | Path) -> dict[str, str]:
    """Where the four datasets' roots lie under a mini-benchmark folder, keyed by the config's
    ``data`` setting (``itl-ray prepare`` reads them; VOC 2007 and 2012 share ``VOCdevkit``)."""
    out = Path(out_dir)
    return {
        "imagenet": str(out / "ILSVRC2012"),
        "voc2007": str(out / "VOCdevkit"),
        "voc2012": str(out / "VOCdevkit"),
        "sun397": str(out / "SUN397"),
    }


def _staging_folder(out: Path) -> Path:
    """A new hidden folder beside ``out`` to build it in (renamed to ``out`` when complete).
    UserError naming ``out`` and the reason, e.g. a parent that is a file."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as error:
        blocker = next((parent for parent in out.parents if parent.is_file()), None)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else error.strerror
        raise UserError(f"cannot create {out} ({reason}); choose a folder you can write") from None
