"""Tests of itl_ray.label_sets: the label sets against the study's released files, the same output
in every process, pascal_removed, the two splits, the user errors, the TSV writer, and the
algorithms on a small class list of our own."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from itl_ray import ilsvrc2012, label_sets, wordnet
from itl_ray.errors import UserError
from tests.conftest import RELEASE, needs_release, wnid

REPO = Path(__file__).resolve().parents[1]


def names(wnids) -> list[str]:
    return [wordnet.synset(w).name() for w in wnids]


@pytest.fixture(scope="module")
def classes() -> list[str]:
    return ilsvrc2012.wnids()


# 12 classes of our own: three domestic cats and a lynx, two retrievers, two cyprinid fish, two
# aircraft, two balls (baseball has two hypernyms: ball and baseball equipment).
SMALL = [
    "tabby.n.01", "persian_cat.n.01", "siamese_cat.n.01", "lynx.n.02",
    "golden_retriever.n.01", "labrador_retriever.n.01", "goldfish.n.01", "tench.n.01",
    "airliner.n.01", "warplane.n.01", "baseball.n.02", "golf_ball.n.01",
]


# --- the published sets -----------------------------------------------------------------------


def read_tsv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as stream:
        rows = list(csv.reader(stream, delimiter="\t"))
    assert rows[0] == ["wnid", "group_wnid"]
    return [tuple(row) for row in rows[1:]]


@needs_release
@pytest.mark.parametrize("set_name", label_sets.PUBLISHED_LABEL_SETS)
def test_published_label_set_row_for_row(set_name, classes):
    published = read_tsv(RELEASE / "published" / f"{set_name}.tsv")
    assert list(label_sets.label_set(set_name, classes).items()) == published


def test_published_sets_have_their_number_of_groups(classes):
    for set_name in label_sets.PUBLISHED_LABEL_SETS:
        groups = label_sets.label_set(set_name, classes)
        assert list(groups) == classes
        assert len(set(groups.values())) == int(set_name.rsplit("_", 1)[1])


def test_the_algorithms_give_exactly_the_published_numbers(classes):
    assert sorted(label_sets.up_down_sets(classes), reverse=True) == [127, 10, 2, 1]
    down_up = [name for name in label_sets.PUBLISHED_LABEL_SETS if name.startswith("down_up")]
    assert sorted(label_sets.down_up_sets(classes), reverse=True) == [int(name[8:]) for name in down_up]
    assert set(label_sets.label_set("down_up_1", classes).values()) == {wnid("entity.n.01")}
    assert set(label_sets.label_set("up_down_2", classes).values()) == {
        wnid("physical_entity.n.01"),
        wnid("abstraction.n.06"),
    }


# --- the same output in every process ---------------------------------------------------------

DIGEST_SCRIPT = """
import hashlib, json
from itl_ray import ilsvrc2012, label_sets, wordnet
classes = ilsvrc2012.wnids()
names = list(label_sets.PUBLISHED_LABEL_SETS) + ["parent", "pascal_removed"] + list(label_sets.SPLIT_NAMES)
out = {name: list(label_sets.label_set(name, classes).items()) for name in names}
out["ancestry"] = [wordnet.ancestry(w) for w in classes]
print(hashlib.sha256(json.dumps(out).encode()).hexdigest())
"""


def test_same_output_whatever_the_hash_seed():
    """nltk 3.10 returns a synset's hypernyms in an order that follows PYTHONHASHSEED; the
    label sets must not. Two fresh processes with different seeds, run side by side."""
    runs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO))
        runs.append(
            subprocess.Popen(
                [sys.executable, "-c", DIGEST_SCRIPT],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    digests = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr
        digests.append(stdout.strip())
    assert re.fullmatch(r"[0-9a-f]{64}", digests[0])
    assert digests[0] == digests[1]


# --- pascal_removed ---------------------------------------------------------------------------


def test_pascal_synsets_are_the_documented_ones():
    chosen = {voc: names(synsets) for voc, synsets in label_sets.PASCAL_VOC_SYNSETS.items()}
    assert chosen == {
        "aeroplane": ["airplane.n.01"], "bicycle": ["bicycle.n.01"], "bird": ["bird.n.01"],
        "boat": ["boat.n.01"], "bottle": ["bottle.n.01"], "bus": ["bus.n.01"], "car": ["car.n.01"],
        "cat": ["cat.n.01"], "chair": ["chair.n.01"], "cow": ["cow.n.02"],
        "diningtable": ["dining_table.n.01"], "dog": ["dog.n.01"], "horse": ["horse.n.01"],
        "motorbike": ["minibike.n.01"], "person": ["person.n.01"], "pottedplant": ["plant.n.02"],
        "sheep": ["sheep.n.01"], "sofa": ["sofa.n.01"], "train": ["train.n.01"],
        "tvmonitor": ["monitor.n.05"],
    }


@needs_release
def test_pascal_synsets_are_the_released_ones():
    released = re.findall(r"'(\w+)': u'(n\d{8})'", (RELEASE / "raw" / "common_pascal_fine.txt").read_text())
    assert len(released) == 20
    assert label_sets.PASCAL_VOC_SYNSETS == {voc: (synset,) for voc, synset in released}


def test_pascal_removed_keeps_771(classes):
    kept = label_sets.label_set("pascal_removed", classes)
    assert len(kept) == 771
    assert all(group == w for w, group in kept.items())
    assert list(kept) == [w for w in classes if w in kept]  # list order
    counts = {voc: len(members) for voc, members in label_sets.pascal_overlap(classes).items()}
    assert counts == {
        "aeroplane": 1, "bicycle": 2, "bird": 59, "boat": 6, "bottle": 7, "bus": 3, "car": 10,
        "cat": 7, "chair": 4, "cow": 0, "diningtable": 1, "dog": 118, "horse": 1, "motorbike": 1,
        "person": 3, "pottedplant": 2, "sheep": 1, "sofa": 1, "train": 1, "tvmonitor": 1,
    }
    assert wnid("minivan.n.01") not in kept  # a car by its second hypernym
    assert "n02403003" in kept  # the ox: cow.n.02 is the cow, not cattle (docs/label_sets.md)


@needs_release
def test_pascal_removed_matches_the_released_overlap_lists(classes):
    text = (RELEASE / "raw" / "common_pascal_coarse.txt").read_text()
    released = {}
    for block in text.split("Dataset class: ")[1:]:
        released[block.split("\n", 1)[0].strip()] = set(re.findall(r"\((n\d{8})\)", block))
    ours = {voc: set(members) for voc, members in label_sets.pascal_overlap(classes).items()}
    assert ours == released
    assert set(label_sets.pascal_removed(classes)) == set(classes) - set().union(*released.values())


# --- splits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "minimal"])
def test_split_halves_are_500_500_disjoint_and_deterministic(kind, classes):
    half_a = label_sets.label_set(f"{kind}_a", classes)
    half_b = label_sets.label_set(f"{kind}_b", classes)
    assert len(half_a) == len(half_b) == 500
    assert not set(half_a) & set(half_b)
    assert set(half_a) | set(half_b) == set(classes)
    assert all(group == w for w, group in {**half_a, **half_b}.items())
    assert list(half_a) == [w for w in classes if w in half_a]  # list order
    assert label_sets.label_set(f"{kind}_a", classes) == half_a  # again: the same
    split = label_sets.random_split if kind == "random" else label_sets.minimal_split
    assert set(split(classes[::-1])[0]) == set(half_a)  # the list's order does not matter


def test_random_split_follows_its_seed(classes):
    assert set(label_sets.random_split(classes, seed=1)[0]) != set(label_sets.random_split(classes)[0])


def test_minimal_split_shares_less_of_the_tree_than_the_random_one(classes):
    minimal = label_sets.shared_ancestors(*label_sets.minimal_split(classes))
    random = label_sets.shared_ancestors(*label_sets.random_split(classes))
    assert names(minimal) == [
        "entity.n.01", "physical_entity.n.01", "object.n.01", "whole.n.02", "artifact.n.01"
    ]
    assert max(map(wordnet.depth, minimal)) == 4  # artifact
    assert len(random) > 300
    assert max(map(wordnet.depth, random)) > 10


def test_minimal_split_keeps_cats_and_dogs_apart():
    cats = [wnid("tabby.n.01"), wnid("persian_cat.n.01")]
    dogs = [wnid("golden_retriever.n.01"), wnid("labrador_retriever.n.01")]
    half_a, half_b = label_sets.minimal_split([cats[0], dogs[0], cats[1], dogs[1]])
    assert {frozenset(half_a), frozenset(half_b)} == {frozenset(cats), frozenset(dogs)}
    assert names(label_sets.shared_ancestors(half_a, half_b))[-1] == "carnivore.n.01"


# --- the algorithms on a small list of our own ------------------------------------------------


def group_names(groups: dict[str, str]) -> list[str]:
    return [wordnet.synset(g).name() for g in groups.values()]


def test_down_up_on_a_small_list():
    small = [wnid(n) for n in SMALL]
    sets = label_sets.down_up_sets(small)
    assert sorted(sets, reverse=True) == [11, 10, 8, 7, 6, 5, 3, 2, 1]
    # the deepest classes (the retrievers, depth 17) go up first
    assert group_names(sets[11]) == SMALL[:4] + ["retriever.n.01"] * 2 + SMALL[6:]
    # then the cyprinids (16), then everything at 15 ...
    assert group_names(sets[8]) == (
        ["domestic_cat.n.01"] * 3 + ["wildcat.n.03"] + ["hunting_dog.n.01"] * 2
        + ["cypriniform_fish.n.01"] * 2 + SMALL[8:]
    )
    assert group_names(sets[3]) == ["vertebrate.n.01"] * 8 + ["craft.n.02"] * 2 + ["ball.n.01"] * 2
    assert group_names(sets[1]) == ["whole.n.02"] * 12  # the first step that reaches one group


def test_up_down_on_a_small_list():
    small = [wnid(n) for n in SMALL]
    sets = label_sets.up_down_sets(small)
    assert sorted(sets, reverse=True) == [6, 5, 3, 1]
    # one step up; the airplane lies under the warplane's parent, so it merges into it
    assert group_names(sets[6]) == (
        ["domestic_cat.n.01"] * 3 + ["wildcat.n.03"] + ["retriever.n.01"] * 2
        + ["cyprinid.n.01"] * 2 + ["heavier-than-air_craft.n.01"] * 2 + ["ball.n.01"] * 2
    )
    # 5 groups come from two steps; the first one names them
    assert group_names(sets[5]) == (
        ["cat.n.01"] * 4 + ["sporting_dog.n.01"] * 2 + ["cypriniform_fish.n.01"] * 2
        + ["aircraft.n.01"] * 2 + ["game_equipment.n.01"] * 2
    )
    # dog lies under carnivore and vehicle under instrumentality: both merge upwards
    assert group_names(sets[3]) == (
        ["carnivore.n.01"] * 6 + ["teleost_fish.n.01"] * 2 + ["instrumentality.n.03"] * 4
    )
    assert label_sets.label_set("up_down_3", small) == sets[3]


def test_small_list_pascal_and_parent():
    small = [wnid(n) for n in SMALL]
    kept = label_sets.label_set("pascal_removed", small)
    assert names(kept) == ["goldfish.n.01", "tench.n.01", "warplane.n.01", "baseball.n.02", "golf_ball.n.01"]
    assert group_names(label_sets.label_set("parent", small))[-2:] == ["ball.n.01", "ball.n.01"]


# --- user errors ------------------------------------------------------------------------------


def test_an_n_the_algorithm_does_not_produce_lists_the_valid_ones(classes):
    expected = r"'up_down_5' does not exist for these 1000 classes; up_down gives N = 127, 10, 2, 1$"
    with pytest.raises(UserError, match=expected):
        label_sets.label_set("up_down_5", classes)
    with pytest.raises(UserError, match=r"down_up gives N = 999, 977, 918, .*, 5, 2, 1$"):
        label_sets.label_set("down_up_1000", classes)
    small = [wnid(n) for n in SMALL]
    with pytest.raises(UserError, match=r"these 12 classes; up_down gives N = 6, 5, 3, 1$"):
        label_sets.label_set("up_down_127", small)


@pytest.mark.parametrize("set_name", ["coarse", "up_down_x", "down_up_", "up_down", "random_c", "Fine"])
def test_unknown_label_set_lists_the_known_names(set_name, classes):
    known = "fine, parent, up_down_<N>, down_up_<N>, pascal_removed, random_a, random_b, minimal_a, minimal_b"
    with pytest.raises(UserError, match=rf"unknown label set .*; known: {known}$"):
        label_sets.label_set(set_name, classes)


def test_bad_class_lists():
    with pytest.raises(UserError, match=r"'n99999999' is not a noun in WordNet 3.0"):
        label_sets.label_set("fine", ["n01440764", "n99999999"])
    with pytest.raises(UserError, match=r"'dog' is not a WordNet noun id"):
        label_sets.label_set("fine", ["dog"])
    with pytest.raises(UserError, match=r"names n01440764 twice"):
        label_sets.label_set("fine", ["n01440764", "n01440764"])
    with pytest.raises(UserError, match=r"empty"):
        label_sets.label_set("fine", [])
    with pytest.raises(UserError, match=r"a split needs at least 2 classes, the list has 1"):
        label_sets.label_set("minimal_a", ["n01440764"])
    with pytest.raises(UserError, match=r"down_up gives N = no set \(all at the root\)"):
        label_sets.label_set("down_up_1", [wnid("entity.n.01")])


def test_classes_file_errors_name_the_line(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# my classes\n\nn01440764\nn01443537  # goldfish\nn0144376\n")
    with pytest.raises(UserError, match=r"classes.txt line 5: 'n0144376' is not a WordNet noun id"):
        label_sets.read_classes_file(path)
    path.write_text("n01440764\nn01443537\nn01443538\n")
    with pytest.raises(UserError, match=r"classes.txt line 3: 'n01443538' is not a noun in WordNet 3.0"):
        label_sets.write_label_set("fine", str(path), None)
    path.write_text("n01440764\n\nn01440764\n")
    with pytest.raises(UserError, match=r"line 3: n01440764 is listed twice \(first on line 1\)"):
        label_sets.read_classes_file(path)
    path.write_text("# nothing\n\n")
    with pytest.raises(UserError, match=r"lists no classes"):
        label_sets.read_classes_file(path)
    with pytest.raises(UserError, match=r"cannot read classes file .*missing.txt"):
        label_sets.read_classes_file(tmp_path / "missing.txt")


# --- write_label_set (the body of `itl-ray labels`) -------------------------------------------


def test_write_label_set_to_a_file(tmp_path, classes):
    out = tmp_path / "up_down_127.tsv"
    label_sets.write_label_set("up_down_127", None, str(out))
    rows = read_tsv(out)
    assert rows == list(label_sets.label_set("up_down_127", classes).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["up_down_127.tsv"]  # no temp file left
    label_sets.write_label_set("pascal_removed", None, str(out))  # replaces it
    assert len(read_tsv(out)) == 771
    with pytest.raises(UserError, match=r"cannot write .*no-such-dir"):
        label_sets.write_label_set("fine", None, str(tmp_path / "no-such-dir" / "x.tsv"))


def test_write_label_set_to_stdout_with_a_classes_file(tmp_path, capsys):
    path = tmp_path / "classes.txt"
    path.write_text("# two fish and an airliner, in this order\nn02690373\nn01443537\n\nn01440764\n")
    label_sets.write_label_set("down_up_2", str(path), None)  # the first step already gives 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "wnid\tgroup_wnid"
    assert [line.split("\t")[0] for line in lines[1:]] == ["n02690373", "n01443537", "n01440764"]
    groups = [line.split("\t")[1] for line in lines[1:]]
    assert names(groups) == ["airliner.n.01", "cyprinid.n.01", "cyprinid.n.01"]
