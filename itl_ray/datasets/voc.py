"""PASCAL VOC in the devkit layout: ``VOCdevkit/VOC2007`` (detection) and ``VOCdevkit/VOC2012``
(action classification).

Boxes are kept as the XML gives them: 1-based pixel coordinates ``(xmin, ymin, xmax, ymax)``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

from itl_ray.datasets import existing_dir, read_lines, required
from itl_ray.errors import UserError

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
    name: str
    box: tuple[int, int, int, int]
    difficult: bool = False
    truncated: bool = False
    actions: tuple[str, ...] = ()  # the actions flagged 1 (action annotations only)


@dataclass(frozen=True)
class VocImage:
    image_id: str
    path: str
    width: int
    height: int
    objects: tuple[VocObject, ...] = field(default_factory=tuple)


def year_dir(root: str | Path, year: str) -> Path:
    """``root`` may be the VOCdevkit folder or the VOC<year> folder inside it."""
    root = existing_dir(root, f"VOC{year}")
    if (root / f"VOC{year}").is_dir():
        return root / f"VOC{year}"
    if (root / "Annotations").is_dir():
        return root
    raise UserError(f"{root} holds neither VOC{year}/ nor Annotations/: point it at VOCdevkit or VOCdevkit/VOC{year}")


def _int(element, tag: str, xml_path: Path) -> int:
    node = element.find(tag)
    if node is None or node.text is None:
        raise UserError(f"{xml_path}: <{tag}> is missing")
    return int(float(node.text))


def parse_annotation(xml_path: Path, image_dir: Path) -> VocImage:
    """One VOC annotation file."""
    try:
        root = ElementTree.parse(xml_path).getroot()
    except (ElementTree.ParseError, OSError) as error:
        raise UserError(f"{xml_path} is not a readable VOC annotation ({error})") from None
    filename = root.findtext("filename") or f"{xml_path.stem}.jpg"
    size = root.find("size")
    if size is None:
        raise UserError(f"{xml_path}: <size> is missing")
    objects = []
    for node in root.findall("object"):
        box_node = node.find("bndbox")
        if box_node is None:
            raise UserError(f"{xml_path}: an <object> has no <bndbox>")
        box = tuple(_int(box_node, tag, xml_path) for tag in ("xmin", "ymin", "xmax", "ymax"))
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
        image_id=xml_path.stem,
        path=str(image_dir / filename),
        width=_int(size, "width", xml_path),
        height=_int(size, "height", xml_path),
        objects=tuple(objects),
    )


def _read_split(base: Path, image_set_dir: str, split: str) -> list[VocImage]:
    annotations = required(base / "Annotations", "VOC Annotations/")
    images = required(base / "JPEGImages", "VOC JPEGImages/")
    split_file = required(base / "ImageSets" / image_set_dir / f"{split}.txt", f"the {split} image list")
    result = []
    for line in read_lines(split_file):
        image_id = line.split()[0]
        xml_path = annotations / f"{image_id}.xml"
        if not xml_path.is_file():
            raise UserError(f"{split_file} names {image_id}, but {xml_path} does not exist")
        image = parse_annotation(xml_path, images)
        if not Path(image.path).is_file():
            raise UserError(f"{split_file} names {image_id}, but its image {image.path} does not exist")
        result.append(image)
    return result


def read_voc2007_detection(root: str | Path, split: str) -> list[VocImage]:
    """VOC 2007 detection images of a split (``trainval`` or ``test``) with all their objects."""
    images = _read_split(year_dir(root, "2007"), "Main", split)
    for image in images:
        for obj in image.objects:
            if obj.name not in VOC_CLASSES:
                raise UserError(f"{image.image_id}.xml: unknown VOC class {obj.name!r}")
    return images


def read_voc2012_actions(root: str | Path, split: str) -> list[VocImage]:
    """VOC 2012 action images of a split (``train`` or ``val``); objects are the annotated persons.

    Only persons with an ``<actions>`` element are kept (the ones the challenge scores).
    """
    images = _read_split(year_dir(root, "2012"), "Action", split)
    return [
        VocImage(image.image_id, image.path, image.width, image.height,
                 tuple(obj for obj in image.objects if obj.name == "person" and obj.actions))
        for image in images
    ]
