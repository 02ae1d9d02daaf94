"""Nested, seeded subsets of ImageNet: (classes, images per class, seed) -> a list of images.

Order classes, and the images within each class, by a hash of (seed, name); a subset takes the
first ``num_classes`` classes and the first ``images_per_class`` images of each. So the 50-per-class
subset lies inside the 125-per-class one, and 10 classes inside 100, on every machine and in every
process (no dependence on PYTHONHASHSEED, file system order or where the data lies): an image's
name is its class folder and file name (``n01440764/n01440764_10026.JPEG``).

Classes with fewer images than asked (ILSVRC-2012 has classes with 732) follow ``shortfall``:
``take_all`` (default: take what the class has, and record how many are missing) or ``error``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from itl_ray.errors import UserError


def _rank(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def image_key(path: str) -> str:
    """An image's name within its dataset (class folder + file), independent of where the root is."""
    return "/".join(path.replace("\\", "/").rsplit("/", 2)[-2:])


@dataclass(frozen=True)
class Subset:
    """One chosen subset of the candidate images (see ``select``)."""

    classes: tuple[str, ...]  # the chosen wnids, in rank order
    indices: tuple[int, ...]  # chosen images as positions in the candidate list, class by class
    shortfall: dict[str, int]  # classes that had fewer images than asked: wnid -> missing count
    subset_hash: str  # 16 hex digits of the sha256 of the chosen image names, in order (content, not location)


def choose_classes(all_classes: Sequence[str], num_classes: int | None, seed: int) -> tuple[str, ...]:
    """The first ``num_classes`` of ``all_classes`` (all when None) in the seed's hash order, so
    fewer classes are a prefix of more. Raises UserError when ``num_classes`` is not between 1
    and the number of classes."""
    if num_classes is None:
        num_classes = len(all_classes)
    if not 1 <= num_classes <= len(all_classes):
        raise UserError(
            f"pretrain.num_classes={num_classes}, but the ImageNet data holds {len(all_classes)} classes"
        )
    ranked = sorted(all_classes, key=lambda wnid: _rank(seed, wnid))
    return tuple(ranked[:num_classes])


def select(labels: Sequence[str], keys: Sequence[str], num_classes: int | None, images_per_class: int, seed: int,
           shortfall_policy: str = "take_all", allowed: set[str] | None = None) -> Subset:
    """The nested subset of the candidate images (``labels[i]`` the wnid and ``keys[i]`` the name,
    see ``image_key``, of image i). ``allowed`` limits the classes drawn from (a label set that
    leaves classes out, like pascal_removed). ``shortfall_policy``: ``take_all`` or ``error``
    (module docstring). Raises UserError for an impossible ``num_classes``, for
    ``images_per_class`` above what every chosen class holds, and under ``error`` for the first
    class with fewer images than asked. ``images_per_class=0`` chooses the classes and no image
    (the random-initialisation control)."""
    by_class: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    pool = sorted(wnid for wnid in by_class if allowed is None or wnid in allowed)
    classes = choose_classes(pool, num_classes, seed)
    most = max(len(by_class[wnid]) for wnid in classes)
    if images_per_class > most:
        raise UserError(
            f"pretrain.images_per_class={images_per_class}, but no chosen class has more than {most} images"
        )
    chosen: list[int] = []
    shortfall = {}
    for wnid in classes:
        ranked = sorted(by_class[wnid], key=lambda index: _rank(seed, keys[index]))
        if len(ranked) < images_per_class:
            if shortfall_policy == "error":
                raise UserError(
                    f"class {wnid} has {len(ranked)} images, fewer than pretrain.images_per_class="
                    f"{images_per_class}; use pretrain.shortfall=take_all to accept it"
                )
            shortfall[wnid] = images_per_class - len(ranked)
        chosen += ranked[:images_per_class]
    digest = hashlib.sha256("\n".join(keys[index] for index in chosen).encode()).hexdigest()
    return Subset(classes=classes, indices=tuple(chosen), shortfall=shortfall, subset_hash=digest[:16])
