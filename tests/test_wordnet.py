"""Tests of itl_ray.wordnet: the class list's synsets, the parent rule over the tree of the 1000
classes, and the offline install from Debian's WordNet files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from itl_ray import ilsvrc2012, wordnet
from itl_ray.errors import UserError
from tests.conftest import RELEASE, needs_release, wnid

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classes() -> list[str]:
    return ilsvrc2012.wnids()


# --- the class list ---------------------------------------------------------------------------


def test_ilsvrc2012_list_is_1000_sorted_nouns(classes):
    assert len(classes) == 1000
    assert classes == sorted(set(classes))
    assert all(re.fullmatch(r"n\d{8}", w) for w in classes)
    assert [wordnet.wnid_of(wordnet.synset(w)) for w in classes] == classes


@needs_release
def test_ilsvrc2012_list_is_the_released_one(classes):
    assert classes == (RELEASE / "raw" / "synsets.txt").read_text().split()


# --- the parent rule --------------------------------------------------------------------------


def test_parent_is_the_hypernym_whose_name_sorts_first():
    assert wordnet.parent(wnid("baseball.n.02")) == wnid("ball.n.01")  # not baseball_equipment
    assert wordnet.parent(wnid("minivan.n.01")) == wnid("car.n.01")  # not passenger_van
    assert wordnet.parent(wnid("tank.n.01")) == wnid("armored_vehicle.n.01")  # of three
    assert wordnet.parent(wnid("entity.n.01")) is None


def test_parent_rule_holds_over_the_whole_tree_of_the_1000(classes):
    above = sorted({up for w in classes for up in wordnet.ancestry(w)})
    several = 0
    for w in above:
        hypernyms = wordnet.synset(w).hypernyms()
        if hypernyms:
            assert wordnet.parent(w) == wordnet.wnid_of(min(hypernyms, key=lambda s: s.name()))
        several += len(hypernyms) > 1
    assert sum(len(wordnet.synset(w).hypernyms()) > 1 for w in classes) == 38
    assert several > 38  # some ancestors have several hypernyms too




# --- the offline install ----------------------------------------------------------------------

needs_debian = pytest.mark.skipif(
    not (wordnet.DEBIAN_WORDNET / "data.noun").is_file(),
    reason=f"Debian's wordnet-base is not installed ({wordnet.DEBIAN_WORDNET}); `make test` installs it when "
           "nltk has no WordNet of its own",
)


@needs_debian
@pytest.mark.filterwarnings("ignore:The multilingual functions")  # nltk's note on a reader without OMW data
def test_install_from_debian_makes_a_corpus_nltk_reads(tmp_path, monkeypatch):
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path), *nltk.data.path])  # searched first, as sys.prefix is
    target = tmp_path / "corpora" / "wordnet"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("from an earlier install")
    assert wordnet.install_from_debian(target=target) == target
    assert not (target / "stale.txt").exists()  # replaced as a whole
    assert sorted(p.name for p in tmp_path.joinpath("corpora").iterdir()) == ["wordnet"]  # no staging left
    lexnames = (target / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45 and lexnames[6] == "06\tnoun.artifact\t1" and lexnames[44] == "44\tadj.ppl\t3"
    found = nltk.data.find("corpora/wordnet")
    assert Path(str(found)) == target
    reader = WordNetCorpusReader(found, None)
    assert reader.get_version() == "3.0"
    dog = reader.synset("dog.n.01")
    assert wordnet.wnid_of(dog) == "n02084071" == wnid("dog.n.01")
    assert reader.synset("tabby.n.01").lexname() == "noun.animal"


def test_install_from_an_incomplete_folder_names_the_missing_files(tmp_path):
    source = tmp_path / "debian"
    source.mkdir()
    (source / "data.noun").write_text("")
    target = tmp_path / "corpora" / "wordnet"
    with pytest.raises(UserError, match=r"WordNet files missing in .*debian: index\.noun, index\.verb, .*cntlist\.rev; "
                                        r"install it with `make demo`"):
        wordnet.install_from_debian(source, target)
    assert not target.parent.exists()  # nothing written


def test_install_command_as_the_makefile_runs_it():
    done = subprocess.run([sys.executable, "-m", "itl_ray.wordnet", "--install"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("WordNet 3.0: ")  # found (nltk already has it) or installed
    wrong = subprocess.run([sys.executable, "-m", "itl_ray.wordnet"], capture_output=True, text=True, cwd=REPO,
                           timeout=300)
    assert wrong.returncode == 2 and wrong.stderr.strip() == "usage: python -m itl_ray.wordnet --install"
