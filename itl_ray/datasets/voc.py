"""PASCAL VOC in the devkit layout: ``VOCdevkit/VOC2007`` (detection) and ``VOCdevkit/VOC2012``
(action classification), and the images of a prepared VOC split as the transfer stages take them
(``voc_images``).

Boxes are kept as the XML gives them: 1-based pixel coordinates ``(xmin, ymin, xmax, ymax)``.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field, replace

import numpy as np

from itl_ray.datasets import Root, read_lines
from itl_ray.errors import UserError
from itl_ray.shards import Prepared

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

# The ten actions of the VOC 2012 action classification challenge ("other" is not scored).
ACTION_CLASSES = (
    "jumping", "phoning", "playinginstrument", "reading", "ridingbike", "ridinghorse", "running",
    "takingphoto", "usingcomputer", "walking",
)


@dataclass(frozen=True)
class VocObject:
    """One annotated object: its VOC class name, its box (1-based inclusive pixel coordinates xmin,
    ymin, xmax, ymax, as in the XML), the devkit's difficult and truncated flags, and (VOC 2012
    action annotations) the actions the person does."""

    name: str
    box: tuple[int, int, int, int]
    difficult: bool = False
    truncated: bool = False
    actions: tuple[str, ...] = ()  # the actions flagged 1 (action annotations only)


@dataclass(frozen=True)
class VocImage:
    """One VOC image: its id (the file stem, ``000005``), its path inside the dataset root (``row N``
    when read from prepared shards), its size in px, its objects, and its encoded bytes when read
    from prepared shards (empty when read from the devkit layout)."""

    image_id: str
    path: str  # inside the dataset root
    width: int
    height: int
    objects: tuple[VocObject, ...] = field(default_factory=tuple)
    jpeg: bytes = field(default=b"", repr=False)  # the stored image, when read from prepared shards


def year_dir(root: Root, year: str) -> str:
    """The VOC<year> folder relative to ``root``, which may be VOCdevkit or VOC<year> itself."""
    if root.is_dir(root.path(f"VOC{year}")):
        return f"VOC{year}"
    if root.is_dir(root.path("Annotations")):
        return ""
    raise UserError(f"{root.display(root.base)} holds neither VOC{year}/ nor Annotations/: point it at VOCdevkit "
                    f"or VOCdevkit/VOC{year}")


def _int(element, tag: str, name: str) -> int:
    node = element.find(tag)
    if node is None or node.text is None:
        raise UserError(f"{name}: <{tag}> is missing")
    try:
        return int(float(node.text))
    except ValueError:
        raise UserError(f"{name}: <{tag}> is {node.text!r}, not a number") from None


def parse_annotation(text: str, name: str, image_dir: str) -> VocImage:
    """One VOC annotation file's contents; ``name`` names it in errors."""
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as error:
        raise UserError(f"{name} is not a readable VOC annotation ({error}); fix or remove it") from None
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    filename = (root.findtext("filename") or f"{stem}.jpg").strip()
    size = root.find("size")
    if size is None:
        raise UserError(f"{name}: <size> is missing")
    objects = []
    for node in root.findall("object"):
        box_node = node.find("bndbox")
        if box_node is None:
            raise UserError(f"{name}: an <object> has no <bndbox>")
        box = tuple(_int(box_node, tag, name) for tag in ("xmin", "ymin", "xmax", "ymax"))
        actions_node = node.find("actions")
        actions = ()
        if actions_node is not None:
            actions = tuple(
                action for action in ACTION_CLASSES if (actions_node.findtext(action) or "0").strip() == "1"
            )
        objects.append(
            VocObject(
                name=(node.findtext("name") or "").strip(),
                box=box,
                difficult=(node.findtext("difficult") or "0").strip() == "1",
                truncated=(node.findtext("truncated") or "0").strip() == "1",
                actions=actions,
            )
        )
    return VocImage(
        image_id=stem,
        path=f"{image_dir}/{filename}".lstrip("/"),
        width=_int(size, "width", name),
        height=_int(size, "height", name),
        objects=tuple(objects),
    )


def _read_split(root: Root, base: str, image_set_dir: str, split: str) -> list[VocImage]:
    def under(*parts: str) -> str:
        return "/".join(part for part in (base, *parts) if part)

    root.required(under("Annotations"), "VOC Annotations/")
    root.required(under("JPEGImages"), "VOC JPEGImages/")
    split_file = root.required(under("ImageSets", image_set_dir, f"{split}.txt"), f"the {split} image list")
    files = root.files_under(base)
    result = []
    for line in read_lines(root.read_text(split_file)):
        image_id = line.split()[0]
        xml_path = root.path(under("Annotations", f"{image_id}.xml"))
        if root.relative(xml_path) not in files:
            raise UserError(f"{root.display(split_file)} names {image_id}, but {root.display(xml_path)} does not exist")
        image = parse_annotation(root.read_text(xml_path), root.display(xml_path), under("JPEGImages"))
        if image.path not in files:
            raise UserError(f"{root.display(split_file)} names {image_id}, but its image "
                            f"{root.display(root.path(image.path))} does not exist")
        result.append(image)
    return result


def read_voc2007_detection(location: str | Root, split: str) -> list[VocImage]:
    """VOC 2007 detection images of a split (``trainval`` or ``test``) with all their objects."""
    root = location if isinstance(location, Root) else Root(location, "VOC2007")
    images = _read_split(root, year_dir(root, "2007"), "Main", split)
    for image in images:
        for obj in image.objects:
            if obj.name not in VOC_CLASSES:
                raise UserError(f"{image.image_id}.xml: unknown VOC class {obj.name!r}")
    return images


def read_voc2012_actions(location: str | Root, split: str) -> list[VocImage]:
    """VOC 2012 action images of a split (``train`` or ``val``); objects are the annotated persons.

    Only persons with an ``<actions>`` element are kept (the ones the challenge scores).
    """
    root = location if isinstance(location, Root) else Root(location, "VOC2012")
    images = _read_split(root, year_dir(root, "2012"), "Action", split)
    return [
        VocImage(image.image_id, image.path, image.width, image.height,
                 tuple(obj for obj in image.objects if obj.name == "person" and obj.actions))
        for image in images
    ]


def _annotations(data: Prepared, rows: np.ndarray) -> list[VocImage]:
    """The manifest's VOC images at ``rows`` (no image bytes): ids, stored sizes and objects, boxes
    scaled from the source image's pixels to the stored image's and rounded (1-based inclusive,
    as in the XML)."""
    columns = {name: data.column(name) for name in ("image_id", "objects", "width", "height", "source_width",
                                                    "source_height")}
    images = []
    for row in rows:
        width, height = columns["width"][row], columns["height"][row]
        sx, sy = width / columns["source_width"][row], height / columns["source_height"][row]
        objects = tuple(
            VocObject(name, (round((x0 - 1) * sx) + 1, round((y0 - 1) * sy) + 1, round((x1 - 1) * sx) + 1,
                             round((y1 - 1) * sy) + 1), bool(difficult), bool(truncated), tuple(actions))
            for name, x0, y0, x1, y1, difficult, truncated, actions in json.loads(columns["objects"][row])
        )
        images.append(VocImage(columns["image_id"][row], f"row {row}", width, height, objects))
    return images


def voc_images(data: Prepared, split: str) -> list[VocImage]:
    """The images of split ``split`` of the prepared VOC dataset ``data``, in manifest order, with
    their objects and stored JPEG bytes (every image's bytes in memory: for small sets; the
    transfer stages read a ``VocSplit`` instead)."""
    rows = data.rows_in(split)
    return [replace(image, jpeg=jpeg) for image, jpeg in zip(_annotations(data, rows), data.read(rows))]


@dataclass(frozen=True)
class VocSplit:
    """One split of a VOC dataset as the detection and action stages read it: every image's
    annotations in memory (``images``, from the manifest: ids, stored sizes, objects in stored-image
    VOC coordinates), the images themselves read one at a time (``encoded``), so that memory does
    not grow with the split beyond its annotations.

    Built by ``voc_split`` from a prepared folder; tests may build one from ``VocImage`` values
    that carry their encoded bytes (``prepared`` None) and, optionally, their proposals."""

    name: str  # e.g. "voc2007 trainval", for messages
    images: tuple[VocImage, ...]
    prepared: Prepared | None = field(default=None, repr=False)
    rows: tuple[int, ...] = ()  # manifest row of each image (with ``prepared``)
    given_proposals: tuple[np.ndarray, ...] | None = field(default=None, repr=False)  # without ``prepared``

    def __len__(self) -> int:
        return len(self.images)

    def encoded(self, index: int) -> bytes:
        """The stored (encoded) image ``index``: read from its memory-mapped shard when prepared."""
        if self.prepared is None:
            return self.images[index].jpeg
        return self.prepared.views([self.rows[index]])[0].tobytes()

    def proposals(self, index: int) -> np.ndarray:
        """Selective Search proposals of image ``index`` as stored at preparation: (K, 4) float32
        boxes (x1, y1, x2, y2), 0-based pixel indices of the stored image, corners inclusive, best
        first. UserError when the split has none (a folder prepared without them)."""
        if self.prepared is None:
            if self.given_proposals is None:
                raise UserError(f"{self.name} has no Selective Search proposals")
            return np.asarray(self.given_proposals[index], dtype=np.float32).reshape(-1, 4)
        if not hasattr(self.prepared, "proposals"):
            raise UserError(f"{self.prepared.folder} holds no Selective Search proposals; run `itl-ray prepare "
                            "voc2007 ROOT OUT` again")
        return self.prepared.proposals(self.rows[index])


def voc_split(data: Prepared, split: str) -> VocSplit:
    """Split ``split`` of the prepared VOC dataset ``data`` as a ``VocSplit``, in manifest order;
    no image is read until a stage asks for it."""
    rows = data.rows_in(split)
    kind = data.info.get("kind", "voc")
    return VocSplit(f"{kind} {split}", tuple(_annotations(data, rows)), data, tuple(int(row) for row in rows))


@dataclass(frozen=True)
class VocSplits:
    """A transfer task's training and test splits (VOC 2007: trainval and test; VOC 2012 actions:
    train and val)."""

    train: VocSplit
    test: VocSplit


def voc_splits(data: Prepared, train: str, test: str) -> VocSplits:
    """``VocSplits`` of the prepared VOC dataset ``data`` (``voc_split`` of each)."""
    return VocSplits(voc_split(data, train), voc_split(data, test))
