"""The study's experiments as the report presents them: the question each answers, how its points
are laid out, which pairs of points it compares, and the study's published figures.

Source of every published figure: Huh, Agrawal, Efros, "What makes ImageNet good for transfer
learning?" (arXiv 1608.08614, 2016), as verified in ../shared/reference/PAPER.md. The study's
other numbers (SUN, ACT, the hierarchy table, induction accuracy) are in its figures; add them to
``PUBLISHED_VALUES`` / ``PUBLISHED_DIFFERENCES`` below when read from there.

An experiment is found by its name (the experiment tags of a sweep's trials, see
``config.SweepSpec``); a name the study does not have (e.g. the demo's ``smoke``) gets the
``generic`` layout: every point against the random-initialisation control.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from itl_ray.metrics import INDUCTION_METRICS

# How experiments are named in specs, tags and file names.
EXPERIMENT_NAME = re.compile(r"[a-z0-9_]+")


def as_experiment_name(text: str) -> str:
    """Any name (a sweep's) as an experiment name: lower case, other characters as ``_``."""
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_") or "experiment"


# Metric name -> (what it measures, axis label with unit). All are percentages.
METRICS: dict[str, tuple[str, str]] = {
    "pretrain_top1": ("ImageNet val, its own label set", "top-1 accuracy (%)"),
    "voc07_det_map": ("PASCAL-DET: VOC 2007 detection", "mAP (%)"),
    "voc12_act_map": ("PASCAL-ACT-CLS: VOC 2012 actions", "mAP (%)"),
    "sun397_acc": ("SUN-CLS: SUN397 scenes", "mean per-class accuracy (%)"),
    "induction_top1": ("Induction: fine classes, top-1", "top-1 accuracy (%)"),
    "induction_top5": ("Induction: fine classes, top-5", "top-5 accuracy (%)"),
}
TRANSFER_METRICS = ("voc07_det_map", "voc12_act_map", "sun397_acc")


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    question: str  # the study's question, as the reader asks it
    layout: str  # images_per_class, classes, budget, categories, induction or generic (see report/plots)
    metrics: tuple[str, ...] = TRANSFER_METRICS  # plotted and compared
    claims: tuple[str, ...] = ()  # what the study says, in words (its numbers are in PUBLISHED_*)
    pairs: tuple[tuple[str, str], ...] = ()  # categories: label-set pairs (A, B) to compare, A - B


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment("images_per_class", "Images per class",
               "Is more data per class better? All classes, fewer images of each.", "images_per_class",
               claims=("PASCAL-DET mAP 58.3 / 57.0 / 54.6 with all (~1000) / 500 / 250 images per class: "
                       "halving the images costs 1.3 mAP (the project page says 1.5).",)),
    Experiment("number_of_classes", "Number of classes",
               "Are more classes better? All images, classes merged to WordNet ancestors.", "classes",
               claims=("127 classes (up_down_127) instead of 1000: PASCAL-DET drops by 2.8 mAP; for some tasks "
                       "fewer classes do better.",)),
    Experiment("fixed_budget", "Fixed budget",
               "For a fixed number of images: more classes with fewer images each, or fewer classes with more?",
               "budget",
               claims=("Fewer classes with more images per class does slightly better than more classes with "
                       "fewer images.",)),
    Experiment("split", "Split",
               "Is fine-grained recognition of every class needed? Half the classes: a random half, or a "
               "half semantically far from the other (minimal split).", "categories",
               pairs=(("minimal_a", "random_a"), ("minimal_b", "random_b"), ("random_a", "random_b"),
                      ("minimal_a", "minimal_b"), ("random_a", "fine"), ("random_b", "fine"),
                      ("minimal_a", "fine"), ("minimal_b", "fine"))),
    Experiment("pascal_removed", "PASCAL classes removed",
               "Does pretraining need the target task's classes? Without every ImageNet class that "
               "overlaps a PASCAL VOC class.", "categories", pairs=(("pascal_removed", "fine"),),
               claims=("771 classes with every PASCAL-overlapping class removed: PASCAL-DET \"nearly the same\" "
                       "as with all of ImageNet.",)),
    Experiment("induction", "Induction",
               "Do features learnt on coarse labels separate the fine classes they never saw as labels?",
               "induction", metrics=INDUCTION_METRICS),
)}


def experiment(name: str) -> Experiment:
    """The study's experiment of this name, or a generic one (each point against the control)."""
    return EXPERIMENTS.get(name) or Experiment(
        name, name.replace("_", " ").capitalize(), "How does each pretraining compare with random initialisation?",
        "generic")


@dataclass(frozen=True)
class PublishedValue:
    """A published metric value at the point whose params equal ``point`` (params as logged)."""

    experiment: str
    metric: str
    point: dict[str, Any]
    value: float
    note: str = ""


@dataclass(frozen=True)
class PublishedDifference:
    """A published difference A - B (None: stated only in words, ``note``)."""

    experiment: str
    metric: str
    a: dict[str, Any]
    b: dict[str, Any]
    value: float | None
    note: str = ""


ALL_IMAGENET = {"label_set": "fine", "num_classes": 1000, "images_per_class": 1300}  # the study's baseline

PUBLISHED_VALUES: tuple[PublishedValue, ...] = (
    PublishedValue("images_per_class", "voc07_det_map", ALL_IMAGENET, 58.3, "all images (the study's '1000')"),
    PublishedValue("images_per_class", "voc07_det_map", {**ALL_IMAGENET, "images_per_class": 500}, 57.0),
    PublishedValue("images_per_class", "voc07_det_map", {**ALL_IMAGENET, "images_per_class": 250}, 54.6),
    PublishedValue("number_of_classes", "voc07_det_map", ALL_IMAGENET, 58.3),
    PublishedValue("number_of_classes", "voc07_det_map", {**ALL_IMAGENET, "label_set": "up_down_127", "num_classes": 127},
                   58.3 - 2.8, "58.3 - 2.8"),
)

PUBLISHED_DIFFERENCES: tuple[PublishedDifference, ...] = (
    PublishedDifference("images_per_class", "voc07_det_map", {**ALL_IMAGENET, "images_per_class": 500}, ALL_IMAGENET,
                        -1.3, "58.3 - 57.0 in the text; the project page says -1.5"),
    PublishedDifference("images_per_class", "voc07_det_map", {**ALL_IMAGENET, "images_per_class": 250}, ALL_IMAGENET,
                        -3.7, "58.3 - 54.6"),
    PublishedDifference("number_of_classes", "voc07_det_map",
                        {**ALL_IMAGENET, "label_set": "up_down_127", "num_classes": 127}, ALL_IMAGENET, -2.8),
    PublishedDifference("pascal_removed", "voc07_det_map", {"label_set": "pascal_removed"}, {"label_set": "fine"},
                        None, "\"nearly the same\""),
)


def matches(params: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a point's params hold every wanted value (compared as text, as MLflow keeps params)."""
    return all(str(params.get(key)) == str(value) for key, value in wanted.items())


@dataclass(frozen=True)
class Comparison:
    """Point A against point B (differences are A - B) on ``metrics``."""

    a: str  # point id
    b: str
    label: str  # e.g. "500 vs 1300 images per class"
    metrics: tuple[str, ...] = field(default=TRANSFER_METRICS)
