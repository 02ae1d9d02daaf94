"""`itl-ray prepare`: shards and manifests from the real layouts, ImageNet's file quirks, resume after
a kill, and one-line errors for bad input with nothing half-written."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itl_ray.datasets.sun397 import read_sun397
from itl_ray.datasets.voc import read_voc2007_detection, read_voc2012_actions, voc_images
from itl_ray.errors import UserError
from itl_ray.images import decode_rgb
from itl_ray.prepare import PrepareSettings, prepare
from itl_ray.shards import Prepared
from tests.conftest import SMALL
from tests.test_cli import assert_one_line_error, itl_ray


def test_imagenet_manifest_counts_labels_and_checksums(mini_paths, raw_paths):
    data = Prepared(mini_paths["imagenet"], "imagenet")
    assert len(data) == 40 * (SMALL.train_per_class + SMALL.val_per_class)
    assert len(data.rows_in("train")) == 40 * SMALL.train_per_class and len(data.rows_in("val")) == 40 * 3
    report = json.loads((Path(mini_paths["imagenet"]) / "report.json").read_text())
    assert report["skipped"] == [] and len(report["per_split"]["train"]["per_class"]) == 40
    assert set(report["per_split"]["train"]["per_class"].values()) == {SMALL.train_per_class}
    labels, sources, sums = data.column("label"), data.column("source"), data.column("sha256")
    for row in (0, 17, len(data) - 1):
        assert sources[row].split("/")[1] == labels[row]  # train/<wnid>/file or val/<wnid>/file
        source_bytes = (Path(raw_paths["imagenet"]) / sources[row]).read_bytes()
        assert sums[row] == hashlib.sha256(source_bytes).hexdigest()
        stored = decode_rgb(data.read([row])[0], sources[row])
        original = decode_rgb(source_bytes, sources[row])
        assert stored.shape == original.shape  # mini images are below 256 px: kept at their size
        assert (stored.float() - original.float()).abs().mean() < 6  # re-encoded at quality 90
    rows = [5, 3, 400, 3]
    assert data.read(rows) == [data.read([row])[0] for row in rows]


def test_voc_objects_and_flags_match_the_xml(mini_paths, raw_paths):
    for kind, setting, read, splits in (("voc2007", "voc2007", read_voc2007_detection, ("trainval", "test")),
                                        ("voc2012-action", "voc2012", read_voc2012_actions, ("train", "val"))):
        data = Prepared(mini_paths[setting], kind)
        for split in splits:
            from_xml = {image.image_id: image for image in read(raw_paths[setting], split)}
            prepared = voc_images(data, split)
            assert sorted(image.image_id for image in prepared) == sorted(from_xml)
            for image in prepared:
                expected = from_xml[image.image_id]
                assert image.objects == expected.objects  # names, boxes, difficult, truncated, actions
                assert (image.width, image.height) == (expected.width, expected.height)
                assert decode_rgb(image.jpeg, image.image_id).shape[1:] == (image.height, image.width)


HAND_WRITTEN = """<annotation><folder>VOC2007</folder><filename>{id}.jpg</filename>
<size><width>80</width><height>60</height><depth>3</depth></size>
<object><name>dog</name><pose>Left</pose><truncated>1</truncated><difficult>0</difficult>
 <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>40</xmax><ymax>60</ymax></bndbox></object>
<object><name>bottle</name><pose>Unspecified</pose><truncated>0</truncated><difficult>1</difficult>
 <bndbox><xmin>50.0</xmin><ymin>10</ymin><xmax>58</xmax><ymax>30</ymax></bndbox></object>
</annotation>"""


def test_hand_written_voc2007_flags_and_splits(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / folder).mkdir(parents=True)
    for image_id in ("000005", "000007", "000009"):
        (base / "Annotations" / f"{image_id}.xml").write_text(HAND_WRITTEN.format(id=image_id))
        Image.new("RGB", (80, 60), (10, 200, 10)).save(base / "JPEGImages" / f"{image_id}.jpg")
    for split, ids in (("train", "000005"), ("val", "000007"), ("trainval", "000005 000007"), ("test", "000009")):
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids.split()) + "\n")
    prepare("voc2007", str(tmp_path / "VOCdevkit"), tmp_path / "out", workers=1)
    data = Prepared(tmp_path / "out", "voc2007")
    assert data.column("split") == ["train,trainval", "val,trainval", "test"]
    for split, expected in (("train", ["000005"]), ("val", ["000007"]), ("trainval", ["000005", "000007"]),
                            ("test", ["000009"])):
        images = voc_images(data, split)
        assert [image.image_id for image in images] == expected
    dog, bottle = voc_images(data, "test")[0].objects
    assert (dog.name, dog.box, dog.truncated, dog.difficult) == ("dog", (1, 2, 40, 60), True, False)
    assert (bottle.name, bottle.box, bottle.truncated, bottle.difficult) == ("bottle", (50, 10, 58, 30), False, True)


def test_sun397_partitions(mini_paths, raw_paths):
    data = Prepared(mini_paths["sun397"], "sun397")
    sources, labels = data.column("source"), data.column("label")
    for partition in (1, 10):
        listed = read_sun397(raw_paths["sun397"], partition)
        for kind, images in (("Training", listed.train), ("Testing", listed.test)):
            rows = data.rows_in(f"{kind}_{partition:02d}")
            assert sorted((sources[r], labels[r]) for r in rows) == sorted((i.path, i.label) for i in images)


def test_short_side_scales_images_and_voc_boxes(tmp_path, raw_paths):
    out = tmp_path / "voc07"
    prepare("voc2007", raw_paths["voc2007"], out, PrepareSettings(short_side=40), workers=1)
    data = Prepared(out, "voc2007")
    full = {image.image_id: image for image in read_voc2007_detection(raw_paths["voc2007"], "trainval")}
    for image in voc_images(data, "trainval")[:10]:
        source = full[image.image_id]
        scale = 40 / min(source.width, source.height)
        assert min(image.width, image.height) == 40
        assert decode_rgb(image.jpeg, image.image_id).shape[1:] == (image.height, image.width)
        for small, big in zip(image.objects, source.objects):
            assert small.name == big.name and small.difficult == big.difficult
            assert all(abs((s - 1) - (b - 1) * scale) <= 1 for s, b in zip(small.box, big.box))


def _jpeg(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", **options)
    return out.getvalue()


def quirky_imagenet(root: Path) -> dict[str, str]:
    """A two-class ILSVRC-2012 root holding the real files' quirks. Returns file -> what it is."""
    rng = np.random.default_rng(0)
    red = Image.new("RGB", (120, 90), (220, 30, 30))
    noise = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    files = {
        "train/n01440764/n01440764_1.JPEG": ("plain", _jpeg(noise, quality=90)),
        "train/n01440764/n01440764_2.JPEG": ("cmyk", _jpeg(red.convert("CMYK"), quality=95)),
        "train/n01440764/n01440764_3.JPEG": ("png", None),
        "train/n01440764/n01440764_4.JPEG": ("gray", _jpeg(noise.convert("L"), quality=90)),
        "train/n01443537/n01443537_1.JPEG": ("corrupt", b"not an image at all" * 10),
        "train/n01443537/n01443537_2.JPEG": ("truncated", _jpeg(noise, quality=90)[:3000]),
        "train/n01443537/n01443537_3.JPEG": ("plain", _jpeg(noise.rotate(90, expand=True), quality=90)),
        "val/n01440764/ILSVRC2012_val_00000001.JPEG": ("plain", _jpeg(noise, quality=80)),
        "val/n01443537/ILSVRC2012_val_00000002.JPEG": ("plain", _jpeg(red, quality=80)),
    }
    png = io.BytesIO()
    red.save(png, format="PNG")
    files["train/n01440764/n01440764_3.JPEG"] = ("png", png.getvalue())
    for name, (_, data) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return {name: what for name, (what, _) in files.items()}


def test_imagenet_quirks_are_handled_and_reported(tmp_path):
    kinds = quirky_imagenet(tmp_path / "raw")
    done = itl_ray("prepare", "imagenet", str(tmp_path / "raw"), str(tmp_path / "out"), "--short-side", "64")
    assert done.returncode == 0, done.stderr
    assert "2 skipped" in done.stdout
    data = Prepared(tmp_path / "out", "imagenet")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert sorted(entry["source"] for entry in report["skipped"]) == sorted(
        name for name, what in kinds.items() if what in ("corrupt", "truncated"))
    assert all(entry["reason"] for entry in report["skipped"])
    assert report["per_split"]["train"]["per_class"] == {"n01440764": 4, "n01443537": 1}
    sources = data.column("source")
    assert len(data) == len(kinds) - 2
    for row, data_bytes in enumerate(data.read(range(len(data)))):
        image = Image.open(io.BytesIO(data_bytes))
        assert image.format == "JPEG" and image.mode == "RGB"  # one decoder reads every stored image
        assert min(image.size) == 64 or kinds[sources[row]] in ("cmyk", "png")  # small ones are not upscaled
        pixels = decode_rgb(data_bytes, sources[row])
        if kinds[sources[row]] in ("cmyk", "png"):  # the red square stays red
            assert pixels[0].float().mean() > 180 and pixels[1].float().mean() < 80
        if kinds[sources[row]] == "gray":
            assert (pixels[0] == pixels[1]).float().mean() > 0.95


def flat_val_imagenet(root: Path) -> None:
    """The quirky root with its validation images moved out of their class folders into val/."""
    quirky_imagenet(root)
    for path in list((root / "val").rglob("*.JPEG")):
        path.rename(root / "val" / path.name)
        path.parent.rmdir()


def test_flat_val_with_kaggle_solution(tmp_path):
    flat_val_imagenet(tmp_path / "raw")
    (tmp_path / "raw" / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000002,n01443537 1 2 3 4\n"
        "ILSVRC2012_val_00000001,n01440764 5 6 7 8 n01440764 1 1 2 2\n")
    prepare("imagenet", str(tmp_path / "raw"), tmp_path / "out", workers=1)
    data = Prepared(tmp_path / "out", "imagenet")
    rows = data.rows_in("val")
    assert sorted((data.column("source")[r], data.column("label")[r]) for r in rows) == [
        ("val/ILSVRC2012_val_00000001.JPEG", "n01440764"), ("val/ILSVRC2012_val_00000002.JPEG", "n01443537")]
    (tmp_path / "raw" / "LOC_val_solution.csv").unlink()
    with pytest.raises(UserError, match="ILSVRC2012_devkit_t12"):
        prepare("imagenet", str(tmp_path / "raw"), tmp_path / "out2", workers=1)
    assert not (tmp_path / "out2").exists()


def test_flat_val_with_the_devkit(tmp_path):
    from tests.test_devkit import SYNSETS, meta_mat

    flat_val_imagenet(tmp_path / "raw")
    # Leaves of the devkit's numbering: ILSVRC2012_ID 1 and 2 are this root's two classes.
    synsets = [dict(SYNSETS[0], WNID="n01443537"), SYNSETS[1], dict(SYNSETS[2], WNID="n01440764")]
    devkit = tmp_path / "raw" / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    (devkit / "meta.mat").write_bytes(meta_mat(synsets))
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n")
    prepare("imagenet", str(tmp_path / "raw"), tmp_path / "out", workers=1)
    data = Prepared(tmp_path / "out", "imagenet")
    assert sorted((data.column("source")[r], data.column("label")[r]) for r in data.rows_in("val")) == [
        ("val/ILSVRC2012_val_00000001.JPEG", "n01440764"), ("val/ILSVRC2012_val_00000002.JPEG", "n01443537")]
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n7\n")
    with pytest.raises(UserError, match="names ILSVRC2012_ID 7, which meta.mat does not define"):
        prepare("imagenet", str(tmp_path / "raw"), tmp_path / "out2", workers=1)


def test_a_uri_root_reads_like_a_local_path(tmp_path, raw_paths):
    prepare("sun397", "file://" + raw_paths["sun397"], tmp_path / "uri", workers=1)
    prepare("sun397", raw_paths["sun397"], tmp_path / "local", workers=1)
    uri, local = Prepared(tmp_path / "uri", "sun397"), Prepared(tmp_path / "local", "sun397")
    assert uri.column("source") == local.column("source") and uri.column("sha256") == local.column("sha256")
    assert uri.read([0, 7]) == local.read([0, 7])


def _shard_files(folder: Path) -> dict[str, int]:
    if not (folder / "shards").is_dir():
        return {}
    return {path.name: path.stat().st_mtime_ns for path in sorted((folder / "shards").glob("shard-*.arrow"))}


def test_resume_after_a_kill_keeps_finished_shards(tmp_path, raw_paths):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "itl_ray.cli", "prepare", "imagenet", raw_paths["imagenet"], str(out),
               "--shard-size", "5", "--workers", "1"]
    shards = 40 * (SMALL.train_per_class + SMALL.val_per_class) // 5
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and len(_shard_files(out)) < 3:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = _shard_files(out)
    assert 3 <= len(before) < shards, f"the kill should land in the middle of the {shards} shards"
    assert not (out / "PREPARED.json").exists() and not (out / "manifest.parquet").exists()
    with pytest.raises(UserError, match="did not finish"):
        Prepared(out, "imagenet")

    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = _shard_files(out)
    assert len(after) == shards and all(after[name] == mtime for name, mtime in before.items())
    assert not list((out / "shards").glob(".*.tmp"))

    fresh = tmp_path / "fresh"
    prepare("imagenet", raw_paths["imagenet"], fresh, PrepareSettings(short_side=256, shard_size=5), workers=2)
    resumed, uninterrupted = Prepared(out, "imagenet"), Prepared(fresh, "imagenet")
    assert resumed.manifest.equals(uninterrupted.manifest)
    assert resumed.read(range(len(resumed))) == uninterrupted.read(range(len(uninterrupted)))


def test_prepare_again_is_a_no_op_and_other_settings_are_refused(tmp_path, raw_paths):
    out = tmp_path / "out"
    assert itl_ray("prepare", "sun397", raw_paths["sun397"], str(out)).returncode == 0
    files = {path: path.stat().st_mtime_ns for path in out.rglob("*")}
    again = itl_ray("prepare", "sun397", raw_paths["sun397"], str(out))
    assert again.returncode == 0 and {path: path.stat().st_mtime_ns for path in out.rglob("*")} == files
    assert_one_line_error(itl_ray("prepare", "sun397", raw_paths["sun397"], str(out), "--short-side", "128"),
                          str(out), "different dataset or settings", "settings")
    assert_one_line_error(itl_ray("prepare", "imagenet", raw_paths["imagenet"], str(out)),
                          "different dataset or settings", "kind")
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == files


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, mini):
    out = tmp_path / "out"
    assert_one_line_error(itl_ray("prepare", "imagenet", str(tmp_path / "missing"), str(out)),
                          "missing", "does not exist")
    assert_one_line_error(itl_ray("prepare", "cifar10", str(tmp_path), str(out)),
                          "unknown dataset kind 'cifar10'", "imagenet, voc2007, voc2012-action, sun397")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(itl_ray("prepare", "imagenet", str(tmp_path / "empty"), str(out)),
                          "ILSVRC-2012 train/<wnid>/ folders", str(tmp_path / "empty" / "train"))
    assert_one_line_error(itl_ray("prepare", "voc2007", str(tmp_path / "empty"), str(out)),
                          "neither VOC2007/ nor Annotations/")

    voc = tmp_path / "voc"
    shutil.copytree(mini / "VOCdevkit" / "VOC2007", voc / "VOC2007")
    broken = voc / "VOC2007" / "Annotations" / "000001.xml"
    broken.write_text("<annotation><size>")
    assert_one_line_error(itl_ray("prepare", "voc2007", str(voc), str(out)),
                          f"{broken} is not a readable VOC annotation")

    sun = tmp_path / "sun"
    shutil.copytree(mini / "SUN397", sun)
    listed = (sun / "Partitions" / "Testing_04.txt").read_text().split()[0]
    (sun / listed.lstrip("/")).unlink()
    assert_one_line_error(itl_ray("prepare", "sun397", str(sun), str(out)),
                          "/Partitions/", f".txt names {listed}, but {sun / listed.lstrip('/')} does not exist")

    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    assert_one_line_error(itl_ray("prepare", "sun397", str(mini / "SUN397"), str(tmp_path / "occupied")),
                          "is not an itl_ray prepared folder")
    assert (tmp_path / "occupied" / "notes.txt").read_text() == "mine"
    assert not out.exists()
