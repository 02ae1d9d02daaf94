"""The mini-benchmark in the real layouts, read back by the readers that read the real data."""

from __future__ import annotations

import shutil

import pytest

from itl_ray import label_sets, wordnet
from itl_ray.datasets.imagenet import read_imagenet
from itl_ray.datasets.sun397 import read_sun397
from itl_ray.datasets.synthetic import MINI_CLASSES, SUN_SCENES, instance_synsets, synthesize
from itl_ray.datasets.voc import ACTION_CLASSES, VOC_CLASSES, read_voc2007_detection, read_voc2012_actions
from itl_ray.errors import UserError
from tests.conftest import SMALL


def test_imagenet_layout(mini, raw_paths):
    data = read_imagenet(raw_paths["imagenet"])
    assert data.classes == tuple(sorted(MINI_CLASSES))
    assert len(data.train) == 40 * SMALL.train_per_class and len(data.val) == 40 * SMALL.val_per_class
    assert (mini / "ILSVRC2012" / "train" / "n02085620" / "n02085620_1.JPEG").is_file()
    assert all(image.path.startswith("val/") and image.path.endswith(".JPEG") for image in data.val)


def test_voc2007_layout(raw_paths):
    trainval = read_voc2007_detection(raw_paths["voc2007"], "trainval")
    test = read_voc2007_detection(raw_paths["voc2007"], "test")
    assert len(trainval) == SMALL.voc07_trainval and len(test) == SMALL.voc07_test
    objects = [obj for image in trainval + test for obj in image.objects]
    assert objects and all(obj.name in VOC_CLASSES for obj in objects)
    for image in trainval:
        for obj in image.objects:
            xmin, ymin, xmax, ymax = obj.box
            assert 1 <= xmin <= xmax <= image.width and 1 <= ymin <= ymax <= image.height
            if obj.difficult:
                assert min(xmax - xmin, ymax - ymin) < 26


def test_voc2012_actions_layout(mini, raw_paths):
    train = read_voc2012_actions(raw_paths["voc2012"], "train")
    persons = [obj for image in train for obj in image.objects]
    assert persons and all(obj.name == "person" and len(obj.actions) == 1 for obj in persons)
    assert {a for p in persons for a in p.actions} <= set(ACTION_CLASSES)
    # The per-action lists agree with the XML flags.
    lines = (mini / "VOCdevkit/VOC2012/ImageSets/Action/jumping_train.txt").read_text().splitlines()
    positives = sum(1 for line in lines if line.split()[2] == "1")
    assert positives == sum(1 for p in persons if "jumping" in p.actions)


def test_sun397_layout(raw_paths):
    data = read_sun397(raw_paths["sun397"], partition=3)
    assert data.classes == SUN_SCENES
    half = SMALL.sun_per_scene // 2
    assert len(data.train) == len(data.test) == len(SUN_SCENES) * half
    assert not {i.path for i in data.train} & {i.path for i in data.test}
    assert all(image.path.startswith(image.label.lstrip("/") + "/") for image in data.train)


def test_synth_is_deterministic_and_refuses_other_settings(tmp_path, mini):
    again = synthesize(tmp_path / "again", seed=0, sizes=SMALL)
    first = sorted(p.relative_to(mini) for p in mini.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second
    sample = "VOCdevkit/VOC2007/JPEGImages/000003.jpg"
    assert (mini / sample).read_bytes() == (again / sample).read_bytes()
    with pytest.raises(UserError, match="other settings"):
        synthesize(again, seed=1, sizes=SMALL)


def test_bad_layouts_are_named(tmp_path, mini):
    with pytest.raises(UserError, match="does not exist"):
        read_imagenet(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="train/<wnid>"):
        read_imagenet(tmp_path / "empty")
    broken = tmp_path / "voc"
    shutil.copytree(mini / "VOCdevkit" / "VOC2007", broken / "VOC2007")
    (broken / "VOC2007" / "Annotations" / "000001.xml").write_text("<annotation><size>")
    with pytest.raises(UserError, match="000001.xml is not a readable VOC annotation"):
        read_voc2007_detection(broken, "trainval")
    sun = tmp_path / "sun"
    shutil.copytree(mini / "SUN397", sun)
    listed = (sun / "Partitions" / "Training_01.txt").read_text().split()[0]
    (sun / listed.lstrip("/")).unlink()
    with pytest.raises(UserError, match=f"Training_01.txt names {listed}"):
        read_sun397(sun, 1)


def test_voc_objects_are_the_classes_pascal_removed_removes():
    """The miniature PASCAL-removed experiment is the study's: a VOC object is drawn as one of
    the mini ImageNet classes that pascal_removed takes out for its VOC class, never as a class
    it keeps; a VOC class no mini class overlaps is drawn as its own synset (in no class)."""
    drawn = instance_synsets()
    overlap = label_sets.pascal_overlap(MINI_CLASSES)
    removed = set(MINI_CLASSES) - set(label_sets.pascal_removed(MINI_CLASSES))
    assert set(drawn) == set(VOC_CLASSES)
    assert {w for synsets in drawn.values() for w in synsets if w in MINI_CLASSES} == removed
    for voc_class, synsets in drawn.items():
        assert synsets == (overlap[voc_class] or list(label_sets.PASCAL_VOC_SYNSETS[voc_class])), voc_class
    assert len(removed) == 27
    assert {voc: [wordnet.synset(w).name() for w in synsets] for voc, synsets in drawn.items()
            if not set(synsets) <= removed} == {
        "cow": ["cow.n.02"], "person": ["person.n.01"], "pottedplant": ["plant.n.02"], "train": ["train.n.01"],
        "tvmonitor": ["monitor.n.05"],
    }
    kept = [wordnet.synset(w).name() for w in label_sets.pascal_removed(MINI_CLASSES)]
    assert kept == ["ox.n.01", "container_ship.n.01", "electric_locomotive.n.01", "television.n.02", "pot.n.04",
                    "cellular_telephone.n.01", "acoustic_guitar.n.01", "laptop.n.01", "reflex_camera.n.01",
                    "running_shoe.n.01", "backpack.n.01", "basketball.n.02", "orange.n.01"]



def test_the_voc2007_sized_generator_writes_objects_of_every_size(tmp_path):
    from itl_ray.datasets.synthetic import synthesize_voc2007

    root = synthesize_voc2007(tmp_path / "voc", trainval=3, test=2, seed=0, size=(200, 150), workers=1)
    trainval = read_voc2007_detection(str(root / "VOCdevkit"), "trainval")
    test = read_voc2007_detection(str(root / "VOCdevkit"), "test")
    assert [image.image_id for image in trainval + test] == ["000001", "000002", "000003", "000004", "000005"]
    objects = [obj for image in trainval + test for obj in image.objects]
    assert all(1 <= len(image.objects) <= 6 and (image.width, image.height) == (200, 150) for image in trainval)
    for obj in objects:
        xmin, ymin, xmax, ymax = obj.box
        assert 1 <= xmin <= xmax <= 200 and 1 <= ymin <= ymax <= 150 and not obj.difficult
        assert 16 <= min(xmax - xmin + 1, ymax - ymin + 1) <= 150
    again = synthesize_voc2007(tmp_path / "again", trainval=3, test=2, seed=0, size=(200, 150), workers=2)
    sample = "VOCdevkit/VOC2007/JPEGImages/000004.jpg"
    assert (root / sample).read_bytes() == (again / sample).read_bytes()
    with pytest.raises(UserError, match="other settings"):
        synthesize_voc2007(tmp_path / "voc", trainval=4, test=2, seed=0, size=(200, 150))


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_synth_into_a_file_is_one_line_and_writes_nothing(tmp_path, where):
    from itl_ray.datasets.synthetic import synthesize_voc2007

    existing = tmp_path / "afile"
    existing.write_text("not a folder")
    out = existing if where == "a file" else existing / "sub"
    for make in (lambda: synthesize(out, seed=0, sizes=SMALL), lambda: synthesize_voc2007(out, trainval=2, test=2)):
        with pytest.raises(UserError) as refused:
            make()
        assert "\n" not in str(refused.value) and "afile" in str(refused.value)
        assert "choose" in str(refused.value)
    assert existing.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
