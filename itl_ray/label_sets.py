"""The label sets of the study: which group each pretraining class is trained as.

A label set maps every class wnid (``n02084071``) to the wnid of the group it is trained as.
``fine`` is the identity; ``up_down_<N>`` and ``down_up_<N>`` merge classes into WordNet
ancestors (the study's hierarchy experiment, Huh et al. 2016); ``pascal_removed``
and the splits keep a subset of the classes, each mapped to itself. ``label_set(name, wnids)``
gives any of them by name; ``write_label_set`` is ``itl-ray labels``. docs/label_sets.md describes
the algorithms and the figures they reproduce (all 21 released sets, row for row; 771 classes
left by pascal_removed).

The tree is WordNet 3.0's, walked through ``itl_ray.wordnet`` ("the parent" of a synset is the
rule documented there). Results are cached per class list, so the 21 sets of one list cost one
pass; callers get copies.
"""

from __future__ import annotations

import functools
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from itl_ray import ilsvrc2012
from itl_ray.errors import UserError
from itl_ray.files import write_atomically
from itl_ray.wordnet import all_ancestors, ancestry, depth, parent, synset

def read_classes_file(path: str | Path) -> list[str]:
    """The wnids of a classes file: one per line, blank lines and ``#`` comments ignored.

    A line that is not a WordNet noun, or a class listed twice, is a UserError naming the line:
    a typo in a class list must never silently train on fewer classes.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise UserError(f"cannot read classes file {path}: {reason}") from None
    wnids: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        wnid = line.split("#", 1)[0].strip()
        if not wnid:
            continue
        try:
            synset(wnid)
        except UserError as error:
            raise UserError(f"{path} line {number}: {error}") from None
        if wnid in first_line:
            first = first_line[wnid]
            raise UserError(f"{path} line {number}: {wnid} is listed twice (first on line {first})")
        first_line[wnid] = number
        wnids.append(wnid)
    if not wnids:
        raise UserError(f"{path} lists no classes (expected one wnid per line, # starts a comment)")
    return wnids


def _checked(wnids: Sequence[str]) -> tuple[str, ...]:
    """The class list as a tuple (a cache key), after checking every wnid is a WordNet noun."""
    wnids = tuple(wnids)
    if not wnids:
        raise UserError("the class list is empty")
    seen: set[str] = set()
    for wnid in wnids:
        synset(wnid)
        if wnid in seen:
            raise UserError(f"the class list names {wnid} twice")
        seen.add(wnid)
    return wnids


def down_up_sets(wnids: Sequence[str]) -> dict[int, dict[str, str]]:
    """Every ``down_up`` label set of these classes, keyed by its number of groups N.

    Cut the tree from the bottom: each step replaces the current groups at the greatest depth
    by their parents; every step gives one set, until all classes sit at the root. When a step
    merges nothing (N unchanged), the partition is unchanged too and the first of those steps
    keeps N, so its groups are the most specific names. Raises UserError for a bad class list
    (as ``label_set``).
    """
    return {n: dict(groups) for n, groups in _down_up_sets(_checked(wnids)).items()}


@functools.lru_cache(maxsize=8)
def _down_up_sets(wnids: tuple[str, ...]) -> dict[int, dict[str, str]]:
    """``down_up_sets`` for a checked tuple, cached: the 18 sets of one list come from one pass.
    Callers must not modify the result."""
    groups = {wnid: wnid for wnid in wnids}
    sets: dict[int, dict[str, str]] = {}
    while True:
        deepest = max(depth(group) for group in groups.values())
        if deepest == 0:
            return sets
        groups = {
            wnid: (parent(group) if depth(group) == deepest else group) for wnid, group in groups.items()
        }
        sets.setdefault(len(set(groups.values())), groups)


def up_down_sets(wnids: Sequence[str]) -> dict[int, dict[str, str]]:
    """Every ``up_down`` label set of these classes, keyed by its number of groups N.

    Each step moves every current group one step up (the root stays), then merges every new
    group that lies under another new group into the highest one above it, so the groups never
    nest. For the 1000 ILSVRC classes the steps give 127, 10, 2 and 1 groups. Steps that merge
    nothing are handled as in ``down_up_sets``.
    """
    return {n: dict(groups) for n, groups in _up_down_sets(_checked(wnids)).items()}


@functools.lru_cache(maxsize=8)
def _up_down_sets(wnids: tuple[str, ...]) -> dict[int, dict[str, str]]:
    """``up_down_sets`` for a checked tuple, cached. Callers must not modify the result."""
    groups = {wnid: wnid for wnid in wnids}
    sets: dict[int, dict[str, str]] = {}
    while True:
        moved = {group: parent(group) or group for group in groups.values()}
        current = frozenset(moved.values())  # membership tests only

        def highest(group: str) -> str:
            # ancestry runs root first and ends with the group itself, so this always finds one
            return next(above for above in ancestry(group) if above in current)

        new_groups = {wnid: highest(moved[group]) for wnid, group in groups.items()}
        if new_groups == groups:
            return sets
        groups = new_groups
        sets.setdefault(len(set(groups.values())), groups)


# The WordNet 3.0 synset(s) of each PASCAL VOC class: the one home of this table (the
# mini-benchmark's generator draws its VOC objects from it too). A class of the list is "PASCAL
# overlapping" when it lies under one of them by any hypernym path. These are the synsets the
# study released for the VOC classes (its common_pascal_fine.txt names these 20 wnids), and they
# give its released overlap lists exactly (common_pascal_coarse.txt), so the 1000 ILSVRC classes
# keep 771 (229 removed). Where a broader or narrower synset would also read as the class, the
# overlap lists decide: cat.n.01 (not domestic_cat.n.01) because cougar and lynx are listed;
# plant.n.02 (not pot.n.04) because daisy and yellow lady's slipper are, the pot class is not;
# monitor.n.05 (not television_receiver.n.01, which holds no ILSVRC class) because the monitor
# class is; minibike.n.01 (lemma "motorbike"; motorcycle.n.01 gives the same moped) as released.
# Several are narrow readings, see docs/label_sets.md: cow.n.02 leaves the ox in, boat.n.01 the
# ships, monitor.n.05 the television and the screen.
PASCAL_VOC_SYNSETS: dict[str, tuple[str, ...]] = {
    "aeroplane": ("n02691156",),  # airplane.n.01
    "bicycle": ("n02834778",),  # bicycle.n.01
    "bird": ("n01503061",),  # bird.n.01
    "boat": ("n02858304",),  # boat.n.01
    "bottle": ("n02876657",),  # bottle.n.01
    "bus": ("n02924116",),  # bus.n.01
    "car": ("n02958343",),  # car.n.01
    "cat": ("n02121620",),  # cat.n.01 (domestic cats and wildcats, not big cats)
    "chair": ("n03001627",),  # chair.n.01
    "cow": ("n01887787",),  # cow.n.02 (mature female of cattle and others)
    "diningtable": ("n03201208",),  # dining_table.n.01
    "dog": ("n02084071",),  # dog.n.01
    "horse": ("n02374451",),  # horse.n.01
    "motorbike": ("n03769722",),  # minibike.n.01 (lemma "motorbike")
    "person": ("n00007846",),  # person.n.01
    "pottedplant": ("n00017222",),  # plant.n.02 (flora)
    "sheep": ("n02411705",),  # sheep.n.01
    "sofa": ("n04256520",),  # sofa.n.01
    "train": ("n04468005",),  # train.n.01
    "tvmonitor": ("n03782006",),  # monitor.n.05
}


def pascal_overlap(wnids: Sequence[str]) -> dict[str, list[str]]:
    """For each of the 20 VOC classes (``PASCAL_VOC_SYNSETS`` order), the classes of the list
    under one of its synsets by any hypernym path, in list order; a class can overlap two VOC
    classes. UserError for a bad class list."""
    wnids = _checked(wnids)
    return {
        voc_class: [wnid for wnid in wnids if not all_ancestors(wnid).isdisjoint(synsets)]
        for voc_class, synsets in PASCAL_VOC_SYNSETS.items()
    }


def pascal_removed(wnids: Sequence[str]) -> list[str]:
    """The classes left, in list order, after removing every class that overlaps a PASCAL VOC
    class (``pascal_overlap``): 771 of the 1000 ILSVRC-2012 classes, as in the study."""
    removed = {wnid for members in pascal_overlap(wnids).values() for wnid in members}
    return [wnid for wnid in wnids if wnid not in removed]


SPLIT_SEED = 0  # the seed of random_a/random_b; any fixed number, fixed so runs can be compared


def random_split(wnids: Sequence[str], seed: int = SPLIT_SEED) -> tuple[list[str], list[str]]:
    """Halves A (``len // 2`` classes) and B (the rest), drawn at random with a fixed seed.

    The classes are sorted before shuffling, so the halves depend on which classes there are,
    not on the order of the list; each half keeps the list's order.
    """
    shuffled = sorted(_checked_for_split(wnids))
    random.Random(seed).shuffle(shuffled)
    half_a = set(shuffled[: len(shuffled) // 2])
    return [w for w in wnids if w in half_a], [w for w in wnids if w not in half_a]


def _checked_for_split(wnids: Sequence[str]) -> tuple[str, ...]:
    """The checked class list; a split of fewer than two classes would leave a half empty."""
    wnids = _checked(wnids)
    if len(wnids) < 2:
        raise UserError(f"a split needs at least 2 classes, the list has {len(wnids)}")
    return wnids


def shared_ancestors(half_a: Sequence[str], half_b: Sequence[str]) -> list[str]:
    """The synsets of the parent tree with classes on both sides of the cut, root first
    (sorted by depth, then wnid). Its length and deepest member measure how much of the tree
    the two halves share."""
    above_a = {up for wnid in half_a for up in ancestry(wnid)}
    above_b = {up for wnid in half_b for up in ancestry(wnid)}
    return sorted(above_a & above_b, key=lambda wnid: (depth(wnid), wnid))


def minimal_split(wnids: Sequence[str]) -> tuple[list[str], list[str]]:
    """Halves A (``len // 2`` classes) and B that share as few synsets of the tree as possible.

    Criterion: the number of synsets of the parent tree (the tree the label sets use) that have
    classes in both halves is as small as it can be for halves of exactly these sizes. A synset
    is shared unless all its classes went to one side, so the best cut gives whole subtrees to
    one side and splits as few synsets as possible. Found exactly by dynamic programming over
    the tree: for each synset and each k, the fewest shared synsets below it when k of its
    classes go to A (a knapsack over its children). Ties go to the first option met, children
    taken in wnid order, so the result is deterministic.
    """
    wnids = _checked_for_split(wnids)
    classes = set(wnids)
    children: dict[str, list[str]] = {}
    for wnid in sorted(classes):
        chain = ancestry(wnid)
        for up, down in zip(chain, chain[1:]):
            below = children.setdefault(up, [])
            if down not in below:
                below.append(down)
    root = ancestry(wnids[0])[0]

    size: dict[str, int] = {}

    def count(node: str) -> int:
        size[node] = (node in classes) + sum(count(child) for child in children.get(node, []))
        return size[node]

    count(root)
    unreachable = float("inf")
    # choices[node]: for each part of the node (itself when it is a class, then each child
    # subtree), how many classes of that part go to A, for each total so far.
    choices: dict[str, list[tuple[str, list[int]]]] = {}

    def solve(node: str) -> list[float]:
        parts: list[tuple[str, list[float]]] = []
        if node in classes:
            parts.append((node, [0, 0]))  # the class itself: to B or to A, nothing shared
        for child in sorted(children.get(node, [])):
            parts.append((child, solve(child)))
        best: list[float] = [0]
        picks: list[tuple[str, list[int]]] = []
        for part, cost in parts:
            combined = [unreachable] * (len(best) + len(cost) - 1)
            pick = [0] * len(combined)
            for k, before in enumerate(best):
                for j, inside in enumerate(cost):
                    if before + inside < combined[k + j]:
                        combined[k + j] = before + inside
                        pick[k + j] = j
            best = combined
            picks.append((part, pick))
        choices[node] = picks
        # the node itself is shared when it holds classes of both halves
        return [total + (0 < k < size[node]) for k, total in enumerate(best)]

    solve(root)
    half_a: set[str] = set()

    def collect(node: str, k: int) -> None:
        for part, pick in reversed(choices[node]):
            j = pick[k]
            if part == node:
                if j:
                    half_a.add(node)
            else:
                collect(part, j)
            k -= j

    collect(root, len(wnids) // 2)
    return [w for w in wnids if w in half_a], [w for w in wnids if w not in half_a]


# The 21 sets the study released (and trained on), in its order.
PUBLISHED_LABEL_SETS = tuple(f"up_down_{n}" for n in (127, 10, 2)) + tuple(
    f"down_up_{n}"
    for n in (999, 977, 918, 877, 820, 753, 694, 596, 486, 345, 206, 79, 36, 17, 9, 5, 2, 1)
)
SPLIT_NAMES = ("random_a", "random_b", "minimal_a", "minimal_b")
KNOWN_NAMES = "fine, parent, up_down_<N>, down_up_<N>, pascal_removed, " + ", ".join(SPLIT_NAMES)


def label_set(set_name: str, wnids: Sequence[str]) -> dict[str, str]:
    """``wnid -> group_wnid`` for the named label set over these classes, in list order.

    ``fine`` keeps every class; ``parent`` merges each class into its parent (one step up the
    tree); ``up_down_<N>`` and ``down_up_<N>`` are the study's hierarchy sets (N must be one
    the algorithm produces for these classes); ``pascal_removed`` and the splits keep only
    their classes, each mapped to itself.

    Raises UserError for an unknown name (listing the known ones), an N the algorithm does not
    produce for these classes (listing the valid N), and a class list that is empty, repeats a
    wnid or names one that is not a WordNet 3.0 noun.
    """
    wnids = _checked(wnids)
    if set_name == "fine":
        return {wnid: wnid for wnid in wnids}
    if set_name == "parent":
        return {wnid: parent(wnid) or wnid for wnid in wnids}
    if set_name == "pascal_removed":
        return {wnid: wnid for wnid in pascal_removed(wnids)}
    if set_name in SPLIT_NAMES:
        split = random_split if set_name.startswith("random") else minimal_split
        half_a, half_b = split(wnids)
        return {wnid: wnid for wnid in (half_a if set_name.endswith("_a") else half_b)}
    family, _, number = set_name.rpartition("_")
    if family in ("up_down", "down_up") and number.isascii() and number.isdigit():
        sets = _up_down_sets(wnids) if family == "up_down" else _down_up_sets(wnids)
        if int(number) not in sets:
            valid = ", ".join(str(n) for n in sorted(sets, reverse=True)) or "no set (all at the root)"
            raise UserError(
                f"label set {set_name!r} does not exist for these {len(wnids)} classes; "
                f"{family} gives N = {valid}"
            )
        return dict(sets[int(number)])
    raise UserError(f"unknown label set {set_name!r}; known: {KNOWN_NAMES}")


def label_set_tsv(mapping: dict[str, str]) -> str:
    """A label set as TSV text: the header ``wnid<TAB>group_wnid``, then one row per class in
    the mapping's order."""
    return "wnid\tgroup_wnid\n" + "".join(f"{wnid}\t{group}\n" for wnid, group in mapping.items())


def write_label_set(set_name: str, classes_file: str | None, out: str | None) -> None:
    """``itl-ray labels NAME [--classes FILE] [-o OUT.tsv]``: the label set as TSV.

    Header ``wnid<TAB>group_wnid``, one row per class in list order (classes a set leaves out
    have no row). Default classes: the 1000 of ILSVRC-2012 (``ilsvrc2012.wnids()``). Written to
    stdout when ``out`` is None, else atomically (``files.write_atomically``), so a reader never
    sees half. Raises UserError for a bad name or class list (``label_set``, ``read_classes_file``)
    and for an OUT that cannot be written (its folder missing or read-only), naming OUT.
    """
    wnids = read_classes_file(classes_file) if classes_file else ilsvrc2012.wnids()
    text = label_set_tsv(label_set(set_name, wnids))
    if out is None:
        sys.stdout.write(text)
        return
    try:
        write_atomically(out, text)
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror or error}") from None
