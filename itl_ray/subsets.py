"""Nested, seeded subsets of ImageNet: (classes, images per class, seed) -> a list of images.

Order classes, and the images within each class, by a hash of (seed, name); a subset takes the
first ``num_classes`` classes and the first ``images_per_class`` images of each. So the 50-per-class
subset lies inside the 125-per-class one, and 10 classes inside 100, on every machine and in every
process (no dependence on PYTHONHASHSEED or file system order).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from itl_ray.datasets import LabeledImage
from itl_ray.datasets.imagenet import ImageNet
from itl_ray.errors import UserError


def _rank(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def _image_key(image: LabeledImage) -> str:
    """An image's name within its dataset (class folder + file), independent of where the root is."""
    parts = image.path.replace("\\", "/").rsplit("/", 2)
    return "/".join(parts[-2:])


@dataclass(frozen=True)
class Subset:
    classes: tuple[str, ...]  # the chosen wnids, in rank order
    images: tuple[LabeledImage, ...]  # chosen images, class by class
    shortfall: dict[str, int]  # classes that had fewer images than asked: wnid -> missing count
    subset_hash: str  # identifies the image list (content, not location)


def choose_classes(all_classes: tuple[str, ...], num_classes: int | None, seed: int) -> tuple[str, ...]:
    if num_classes is None:
        num_classes = len(all_classes)
    if not 1 <= num_classes <= len(all_classes):
        raise UserError(
            f"pretrain.num_classes={num_classes}, but the ImageNet data holds {len(all_classes)} classes"
        )
    ranked = sorted(all_classes, key=lambda wnid: _rank(seed, wnid))
    return tuple(ranked[:num_classes])


def select(data: ImageNet, num_classes: int | None, images_per_class: int, seed: int,
           shortfall_policy: str = "take_all", allowed: set[str] | None = None) -> Subset:
    """The nested subset; ``shortfall_policy`` says what a class with too few images does:
    ``take_all`` (take what it has, record the shortfall) or ``error``. ``allowed`` limits the
    classes drawn from (a label set that leaves classes out, like pascal_removed)."""
    pool = data.classes if allowed is None else tuple(wnid for wnid in data.classes if wnid in allowed)
    classes = choose_classes(pool, num_classes, seed)
    by_class = data.train_by_class()
    most = max(len(by_class[wnid]) for wnid in classes)
    if images_per_class > most:
        raise UserError(
            f"pretrain.images_per_class={images_per_class}, but no chosen class has more than {most} images"
        )
    chosen: list[LabeledImage] = []
    shortfall = {}
    for wnid in classes:
        ranked = sorted(by_class[wnid], key=lambda image: _rank(seed, _image_key(image)))
        if len(ranked) < images_per_class:
            if shortfall_policy == "error":
                raise UserError(
                    f"class {wnid} has {len(ranked)} images, fewer than pretrain.images_per_class="
                    f"{images_per_class}; use pretrain.shortfall=take_all to accept it"
                )
            shortfall[wnid] = images_per_class - len(ranked)
        chosen += ranked[:images_per_class]
    digest = hashlib.sha256("\n".join(_image_key(image) for image in chosen).encode()).hexdigest()
    return Subset(classes=classes, images=tuple(chosen), shortfall=shortfall, subset_hash=digest[:16])
