"""PASCAL VOC in the devkit layout: ``VOCdevkit/VOC2007`` (detection) and ``VOCdevkit/VOC2012``
(action classification), and the images of a prepared VOC split as the transfer stages take them
(``voc_images``).

Boxes are kept as the XML gives them: 1-based pixel coordinates ``(xmin, ymin, xmax, ymax)``,
both corners inclusive. The readers keep every object as annotated, even one whose box cannot be
right; ``check_boxes`` decides, against the JPEG's real size, which boxes are clipped or dropped
(``itl-ray prepare`` applies it and reports each case per file).
"""

from __future__ import annotations

import json
import posixpath
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass, field

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
    box: tuple[int | None, int | None, int | None, int | None]  # None: missing from the XML (dropped by check_boxes)
    difficult: bool = False
    truncated: bool = False
    actions: tuple[str, ...] = ()  # the actions flagged 1 (action annotations only)
    has_actions: bool = field(default=False, compare=False)  # the object has an <actions> element


@dataclass(frozen=True)
class VocImage:
    """One VOC image: its id (the file stem, ``000005``), its path inside the dataset root (``row N``
    when read from prepared shards), its size in px, its objects, and its encoded bytes when read
    from prepared shards (empty when read from the devkit layout)."""

    image_id: str
    path: str  # inside the dataset root
    width: int  # px: as the annotation declares it (0 if it does not), or as stored (voc_images)
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


def _int(element, tag: str, name: str) -> int | None:
    """A whole number of pixels from ``<tag>`` (VOC writes some as ``273.0``); None when missing.
    UserError naming the file for text that is not a finite number."""
    node = element.find(tag)
    if node is None or node.text is None or not node.text.strip():
        return None
    try:
        return int(float(node.text))
    except (ValueError, OverflowError):
        raise UserError(f"{name}: <{tag}> is {node.text.strip()!r}, not a number; fix or remove the file") from None


def parse_annotation(data: bytes | str, name: str, image_dir: str) -> VocImage:
    """One VOC annotation file's contents; ``name`` names it in errors. Give the file's bytes: the
    parser then honours its encoding declaration (UTF-8, UTF-16 with a byte-order mark, Latin-1).

    Objects are kept as annotated: an object without a complete ``<bndbox>`` gets None for the
    missing coordinates, and boxes are not checked against the image here (``check_boxes`` does
    that with the JPEG's size). A missing ``<size>`` reads as 0 x 0. Raises UserError for a file
    that is not well-formed XML or holds a coordinate that is not a number."""
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise UserError(f"{name} is not a readable VOC annotation ({error}); fix or remove it") from None
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    filename = (root.findtext("filename") or f"{stem}.jpg").strip()
    size = root.find("size")
    width = (_int(size, "width", name) or 0) if size is not None else 0
    height = (_int(size, "height", name) or 0) if size is not None else 0
    objects = []
    for node in root.findall("object"):
        box_node = node.find("bndbox")
        box = tuple(_int(box_node, tag, name) if box_node is not None else None
                    for tag in ("xmin", "ymin", "xmax", "ymax"))
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
                has_actions=actions_node is not None,
            )
        )
    return VocImage(
        image_id=stem,
        path=f"{image_dir}/{filename}".lstrip("/"),
        width=width,
        height=height,
        objects=tuple(objects),
    )


def check_boxes(objects: list[list], width: int, height: int) -> tuple[list[list], list[str], Counter]:
    """The objects of one image whose JPEG is ``width`` x ``height`` px, each as the manifest stores
    it (``[name, xmin, ymin, xmax, ymax, difficult, truncated, actions]``, 1-based inclusive), with
    every box that cannot be right dealt with:

    - a box with a missing coordinate, with xmin > xmax or ymin > ymax, or lying wholly outside the
      image (no pixel of it inside) is dropped;
    - a box partly outside the image (a coordinate below 1 or beyond the width or height) is
      clipped to the image.

    Returns (the objects kept, one line per change naming the object and what was done, counts
    ``{"clipped": n, "dropped": n}``)."""
    kept, notes, counts = [], [], Counter()
    for index, (name, *box, difficult, truncated, actions) in enumerate(objects, start=1):
        what = f"object {index} ({name}) box {tuple(box)}"
        if any(value is None for value in box):
            notes.append(f"{what} has no complete <bndbox>: dropped")
            counts["dropped"] += 1
            continue
        xmin, ymin, xmax, ymax = box
        if xmin > xmax or ymin > ymax:
            notes.append(f"{what} has {'xmin > xmax' if xmin > xmax else 'ymin > ymax'}: dropped")
            counts["dropped"] += 1
            continue
        if xmax < 1 or ymax < 1 or xmin > width or ymin > height:
            notes.append(f"{what} lies wholly outside the {width}x{height} image: dropped")
            counts["dropped"] += 1
            continue
        clipped = [max(xmin, 1), max(ymin, 1), min(xmax, width), min(ymax, height)]
        if clipped != box:
            notes.append(f"{what} reaches outside the {width}x{height} image: clipped to {tuple(clipped)}")
            counts["clipped"] += 1
        kept.append([name, *clipped, difficult, truncated, actions])
    return kept, notes, counts


def annotation_path(image_path: str, image_id: str) -> str:
    """The annotation file of an image, from the image's path inside the root
    (``VOC2007/JPEGImages/000005.jpg`` -> ``VOC2007/Annotations/000005.xml``)."""
    return posixpath.join(posixpath.dirname(posixpath.dirname(image_path)), "Annotations", f"{image_id}.xml")


def _read_split(root: Root, base: str, image_set_dir: str, split: str) -> list[VocImage]:
    def under(*parts: str) -> str:
        return "/".join(part for part in (base, *parts) if part)

    root.required(under("Annotations"), "VOC Annotations/")
    root.required(under("JPEGImages"), "VOC JPEGImages/")
    split_file = root.required(under("ImageSets", image_set_dir, f"{split}.txt"), f"the {split} image list")
    files = root.files_under(base)
    result = []
    # Each image once, in the list's order (VOC 2012's action lists name an image once per person).
    image_ids = dict.fromkeys(line.split()[0] for line in read_lines(root.read_text(split_file)))
    for image_id in image_ids:
        xml_path = root.path(under("Annotations", f"{image_id}.xml"))
        if root.relative(xml_path) not in files:
            raise UserError(f"{root.display(split_file)} names {image_id}, but {root.display(xml_path)} does not exist")
        image = parse_annotation(root.read_bytes(xml_path), root.display(xml_path), under("JPEGImages"))
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

    Every person with an ``<actions>`` element is kept (the ones the challenge scores), also one
    whose only flag is ``other``: its ``actions`` are empty, a negative for each of the ten actions
    (the devkit's per-action lists mark it -1 for all of them). An image may end with no person.
    """
    root = location if isinstance(location, Root) else Root(location, "VOC2012")
    images = _read_split(root, year_dir(root, "2012"), "Action", split)
    return [
        VocImage(image.image_id, image.path, image.width, image.height,
                 tuple(obj for obj in image.objects if obj.name == "person" and obj.has_actions))
        for image in images
    ]


def stored_box(box, sx: float, sy: float) -> tuple[int, int, int, int]:
    """A box (1-based inclusive, source pixels) in the stored image, scaled by (sx, sy) = stored
    size / source size and rounded; still 1-based inclusive."""
    x0, y0, x1, y1 = box
    return (round((x0 - 1) * sx) + 1, round((y0 - 1) * sy) + 1, round((x1 - 1) * sx) + 1, round((y1 - 1) * sy) + 1)


def split_summary(objects_per_image: list[list[list]], actions: bool) -> dict:
    """What one split's annotations hold, for the prepare report: per VOC class the objects and how
    many are difficult, the images without any object, the classes without a non-difficult object
    (their AP is undefined); with ``actions`` (VOC 2012), per action its positives, the persons
    with no action of the ten (``other`` only) and the images without a person. Objects are the
    manifest's lists (see ``check_boxes``)."""
    if actions:
        persons = [obj for objects in objects_per_image for obj in objects]
        positives = Counter(action for obj in persons for action in obj[7])
        return {"persons": len(persons), "per_action": {action: positives[action] for action in ACTION_CLASSES},
                "persons_without_action": sum(1 for obj in persons if not obj[7]),
                "images_without_persons": sum(1 for objects in objects_per_image if not objects)}
    counts = {name: {"objects": 0, "difficult": 0} for name in VOC_CLASSES}
    for objects in objects_per_image:
        for obj in objects:
            counts[obj[0]]["objects"] += 1
            counts[obj[0]]["difficult"] += int(bool(obj[5]))
    return {"per_class_objects": counts,
            "images_without_objects": sum(1 for objects in objects_per_image if not objects),
            "classes_without_positives": [name for name, c in counts.items() if c["objects"] == c["difficult"]]}


def voc_images(data: Prepared, split: str) -> list[VocImage]:
    """The images of split ``split`` of the prepared VOC dataset ``data``, in manifest order, with
    their objects and stored JPEG bytes; boxes are scaled from the source image's pixels to the
    stored image's and rounded (1-based inclusive, as in the XML)."""
    rows = data.rows_in(split)
    columns = {name: data.column(name) for name in ("image_id", "objects", "width", "height", "source_width",
                                                    "source_height")}
    images = []
    for row, jpeg in zip(rows, data.read(rows)):
        width, height = columns["width"][row], columns["height"][row]
        sx, sy = width / columns["source_width"][row], height / columns["source_height"][row]
        objects = tuple(
            VocObject(name, stored_box(box, sx, sy), bool(difficult), bool(truncated), tuple(actions))
            for name, *box, difficult, truncated, actions in json.loads(columns["objects"][row])
        )
        images.append(VocImage(columns["image_id"][row], f"row {row}", width, height, objects, jpeg))
    return images
