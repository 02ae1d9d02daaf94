"""WordNet 3.0 access (through nltk) and the label sets built on it.

A label set maps every class wnid (``n02084071``) to the wnid of the group it is trained as.
``fine`` is the identity; ``up_down_<N>`` and ``down_up_<N>`` merge classes into WordNet
ancestors (the study's hierarchy experiment); ``pascal_removed`` and the splits keep a subset of
the classes, each mapped to itself. docs/label_sets.md describes the algorithms and the figures.

WordNet comes from nltk's data folders when nltk already has it (``nltk.download('wordnet')``),
otherwise from Debian's ``wordnet-base`` + ``wordnet-sense-index`` packages, copied once into a
corpus folder that nltk reads (``install_from_debian``; ``make`` does this).

"The parent" of a synset: WordNet gives some synsets several hypernyms (38 of the 1000 ILSVRC
classes, and more of their ancestors). The parent is the hypernym whose nltk synset name
(``ball.n.01``) sorts first; instance hypernyms count only for a synset that has no ordinary
hypernym. Why: from 2013 (nltk PR #495) nltk returned ``hypernyms()`` sorted by that name, so
``hypernyms()[0]``, what code of the study's time took, was this synset; the rule reproduces
all 21 published label sets exactly. nltk 3.10 no longer sorts: it returns hypernyms in the
order of a Python set of ``(pos, offset)`` tuples, which changes with PYTHONHASHSEED. This module
therefore never relies on nltk's order, and never iterates over a set of synsets unsorted.
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from itl_ray.errors import UserError

DEBIAN_WORDNET = Path("/usr/share/wordnet")

INSTALL_HINT = (
    "install it with `make demo` or `make test` (Debian: apt-get install wordnet-base "
    "wordnet-sense-index, then python -m itl_ray.wordnet --install), "
    "or with internet: python -c \"import nltk; nltk.download('wordnet')\""
)

# The 45 lexicographer files of WordNet 3.0 (number, name, syntactic category), as documented
# in lexnames(5WN); Debian's packages do not ship the file itself, and nltk needs it.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

# The files nltk's WordNet reader opens.
_CORPUS_FILES = [
    f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")
] + ["adj.exc", "adv.exc", "noun.exc", "verb.exc", "index.sense", "cntlist.rev"]


def corpus_dir() -> Path:
    """Where the Debian-built corpus goes: nltk searches ``<sys.prefix>/nltk_data``."""
    return Path(sys.prefix) / "nltk_data" / "corpora" / "wordnet"


def install_from_debian(source: Path = DEBIAN_WORDNET, target: Path | None = None) -> Path:
    """Copy Debian's WordNet 3.0 files into a corpus folder nltk reads (real copies, no links)."""
    target = target or corpus_dir()
    missing = [name for name in _CORPUS_FILES if not (source / name).is_file()]
    if missing:
        raise UserError(f"WordNet files missing in {source}: {', '.join(missing)}; {INSTALL_HINT}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=target.parent))
    for name in _CORPUS_FILES:
        shutil.copyfile(source / name, staging / name)
    lines = [
        f"{number:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n"
        for number, name in enumerate(LEXNAMES)
    ]
    (staging / "lexnames").write_text("".join(lines))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


@functools.lru_cache(maxsize=1)
def load():
    """The nltk WordNet 3.0 reader; a UserError that says how to install WordNet when it is missing.

    Built directly rather than through ``nltk.corpus.wordnet``: that loader also maps WordNet
    "3.0" onto itself for the multilingual (OMW) functions, re-reading index.sense twice, which
    is about half of its load time, and which nothing here uses.
    The reader is otherwise nltk's own, so ``synset('dog.n.01')`` and friends work as usual.
    """
    try:
        import nltk.data
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as error:
        raise UserError(f"nltk is not installed ({error}); run `make test` or pip install nltk") from None

    class WordNetWithoutMultilingual(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None  # no mapping of other WordNet versions: only the multilingual data needs it

    try:
        root = nltk.data.find("corpora/wordnet")  # a folder, or corpora/wordnet.zip
    except LookupError:
        raise UserError(f"WordNet is not installed for nltk; {INSTALL_HINT}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": on purpose
        wordnet = WordNetWithoutMultilingual(root, None)
    if wordnet.get_version() != "3.0":
        raise UserError(f"nltk found WordNet {wordnet.get_version()}, the study needs 3.0; {INSTALL_HINT}")
    return wordnet


def synset(wnid: str):
    """The noun synset of a wnid like ``n02084071``; UserError when it is not a WordNet noun."""
    if len(wnid) != 9 or wnid[0] != "n" or not (wnid[1:].isascii() and wnid[1:].isdigit()):
        raise UserError(f"{wnid!r} is not a WordNet noun id (expected n followed by 8 digits)")
    wordnet = load()
    with warnings.catch_warnings():
        # nltk warns and returns None for an offset that starts no synset; we raise instead
        warnings.simplefilter("ignore")
        try:
            found = wordnet.synset_from_pos_and_offset("n", int(wnid[1:]))
        except Exception:  # older nltk raised its own lookup errors here
            found = None
    if found is None:
        raise UserError(f"{wnid!r} is not a noun in WordNet 3.0")
    return found


def wnid_of(syn) -> str:
    """The wnid (``n`` + 8-digit offset) of an nltk noun synset."""
    return f"n{syn.offset():08d}"


@functools.lru_cache(maxsize=None)
def parent(wnid: str) -> str | None:
    """The one hypernym that counts as parent (see the module docstring); None at the root.

    The first by nltk synset name of the ordinary hypernyms, else of the instance hypernyms:
    the rule under which the study's published label sets come out exactly, and one that does
    not depend on the order nltk happens to return them in.
    """
    syn = synset(wnid)
    candidates = syn.hypernyms() or syn.instance_hypernyms()
    if not candidates:
        return None
    return wnid_of(min(candidates, key=lambda candidate: candidate.name()))


@functools.lru_cache(maxsize=None)
def ancestry(wnid: str) -> tuple[str, ...]:
    """The chain of parents from the root (``entity``) down to ``wnid`` itself (cached)."""
    up = parent(wnid)
    return (ancestry(up) if up else ()) + (wnid,)


def depth(wnid: str) -> int:
    """Steps from the root along the parent chain: ``entity`` is 0, ``physical_entity`` 1."""
    return len(ancestry(wnid)) - 1


@functools.lru_cache(maxsize=None)
def all_ancestors(wnid: str) -> frozenset[str]:
    """Every synset on any hypernym path above ``wnid`` (every parent, not just "the" one),
    ``wnid`` included.

    "Is a descendant of" for PASCAL overlap means any path: a minivan is a car even if its
    chosen parent were the van. Only used for membership tests, so a frozenset is safe.
    """
    syn = synset(wnid)
    found = {wnid}
    for up in syn.hypernyms() + syn.instance_hypernyms():
        found |= all_ancestors(wnid_of(up))
    return frozenset(found)


def name(wnid: str) -> str:
    """A readable name for a wnid: the synset's first lemma."""
    return synset(wnid).lemma_names()[0]


# ---------------------------------------------------------------------------------------------
# The class list
# ---------------------------------------------------------------------------------------------

def ilsvrc2012_wnids() -> list[str]:
    """The 1000 ILSVRC-2012 classes (sorted wnids), the default class list of every label set."""
    from itl_ray import ilsvrc2012

    return ilsvrc2012.wnids()


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


# ---------------------------------------------------------------------------------------------
# Hierarchy label sets: down_up and up_down
# ---------------------------------------------------------------------------------------------


def down_up_sets(wnids: Sequence[str]) -> dict[int, dict[str, str]]:
    """Every ``down_up`` label set of these classes, keyed by its number of groups N.

    Cut the tree from the bottom: each step replaces the current groups at the greatest depth
    by their parents; every step gives one set, until all classes sit at the root. When a step
    merges nothing (N unchanged), the partition is unchanged too and the first of those steps
    keeps N, so its groups are the most specific names.
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


# ---------------------------------------------------------------------------------------------
# PASCAL removed
# ---------------------------------------------------------------------------------------------

# The WordNet 3.0 synset(s) of each PASCAL VOC class. A class of the list is "PASCAL
# overlapping" when it lies under one of them by any hypernym path. These are the synsets the
# study names for the VOC classes, so the 1000 ILSVRC classes keep 771 (229 removed). Several
# are narrow readings, see docs/label_sets.md: cow.n.02 leaves the ox in, boat.n.01 the ships,
# monitor.n.05 the television and the screen.
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
    """For each VOC class, the classes of the list under one of its synsets (list order)."""
    wnids = _checked(wnids)
    return {
        voc_class: [wnid for wnid in wnids if not all_ancestors(wnid).isdisjoint(synsets)]
        for voc_class, synsets in PASCAL_VOC_SYNSETS.items()
    }


def pascal_removed(wnids: Sequence[str]) -> list[str]:
    """The classes left after removing every class that overlaps a PASCAL VOC class."""
    removed = {wnid for members in pascal_overlap(wnids).values() for wnid in members}
    return [wnid for wnid in wnids if wnid not in removed]


# ---------------------------------------------------------------------------------------------
# Splits into two halves
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Label sets by name
# ---------------------------------------------------------------------------------------------

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


def write_label_set(set_name: str, classes_file: str | None, out: str | None) -> None:
    """``itl-ray labels NAME [--classes FILE] [-o OUT.tsv]``: the label set as TSV.

    Header ``wnid<TAB>group_wnid``, one row per class in list order (classes a set leaves out
    have no row). Default classes: the 1000 of ILSVRC-2012. Written to stdout when ``out`` is
    None, else atomically (a temp file beside OUT, then a rename), so a reader never sees half.
    """
    wnids = read_classes_file(classes_file) if classes_file else ilsvrc2012_wnids()
    groups = label_set(set_name, wnids)
    text = "wnid\tgroup_wnid\n" + "".join(f"{wnid}\t{group}\n" for wnid, group in groups.items())
    if out is None:
        sys.stdout.write(text)
        return
    target = Path(out)
    try:
        handle, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise UserError(f"cannot write {out}: {error.strerror}") from None
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.chmod(temp, 0o644)  # mkstemp makes it private; a label set is for everyone to read
        os.replace(temp, target)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UserError(f"cannot write {out}: {error.strerror or error}") from None
        raise


def main(argv: list[str] | None = None) -> int:
    """``python -m itl_ray.wordnet --install``: make WordNet 3.0 available to nltk offline."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--install"]:
        print("usage: python -m itl_ray.wordnet --install", file=sys.stderr)
        return 2
    try:
        load()
        print("WordNet 3.0: nltk already has it")
        return 0
    except UserError:
        pass
    try:
        target = install_from_debian()
        load.cache_clear()
        load()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"WordNet 3.0: installed for nltk in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
