"""WordNet 3.0 through nltk: synsets by wnid, "the parent" of a synset, ancestries, and the
offline install of WordNet from Debian's packages. The label sets built on it are in
``itl_ray.label_sets``.

WordNet comes from nltk's data folders when nltk already has it (``nltk.download('wordnet')``),
otherwise from Debian's ``wordnet-base`` + ``wordnet-sense-index`` packages, copied once into a
corpus folder that nltk reads (``python -m itl_ray.wordnet --install``; ``make`` does this).

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
import shutil
import sys
import tempfile
import warnings
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
    """Where the Debian-built corpus goes: ``<sys.prefix>/nltk_data/corpora/wordnet`` (nltk
    searches ``<sys.prefix>/nltk_data``, so a virtual environment gets its own)."""
    return Path(sys.prefix) / "nltk_data" / "corpora" / "wordnet"


def install_from_debian(source: Path = DEBIAN_WORDNET, target: Path | None = None) -> Path:
    """Copy Debian's WordNet 3.0 files (``source``, from the wordnet-base and wordnet-sense-index
    packages) into a corpus folder nltk reads (``target``, default ``corpus_dir()``), adding the
    ``lexnames`` file Debian does not ship. Real copies, no links; staged beside the target and
    renamed over it, so a failed copy leaves the old corpus. Returns the target. Raises UserError
    listing the files missing in ``source``, with the install hint."""
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
    """The wnid (``n`` + 8-digit offset into WordNet 3.0's data.noun) of an nltk noun synset."""
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
