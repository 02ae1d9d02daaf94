"""`itl-ray prepare`: shards and manifests from the real layouts, ImageNet's file quirks, resume after
a kill, and one-line errors for bad input with nothing half-written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itl_ray import barrier
from itl_ray.datasets.sun397 import read_sun397
from itl_ray.datasets.voc import read_voc2007_detection, read_voc2012_actions, voc_images
from itl_ray.errors import UserError
from itl_ray.images import decode_rgb
from itl_ray.prepare import PrepareSettings, prepare
from itl_ray.shards import Prepared
from tests.conftest import SMALL
from tests.processes import marked, stop
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
    reasons = {entry["source"]: entry["reason"] for entry in report["skipped"]}
    for source, reason in reasons.items():  # the file and the cause, no Python object reprs
        assert reason.startswith(f"{source} cannot be decoded: ") and " at 0x" not in reason, reason
    assert reasons["train/n01443537/n01443537_1.JPEG"].endswith("not an image file Pillow can read (unknown format "
                                                                 "or corrupt header)")
    assert "truncated" in reasons["train/n01443537/n01443537_2.JPEG"]
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


def _shard_files(folder: Path, kind: str = "shards") -> dict[str, int]:
    if not (folder / kind).is_dir():
        return {}
    return {path.name: path.stat().st_mtime_ns for path in sorted((folder / kind).glob("*.arrow"))}


def _kill_at(command: list[str], barriers: Path, point: str) -> tuple[int, int, list[int]]:
    """Run ``command`` until a process reaches ``point`` (held there), SIGKILL the `itl-ray prepare`
    process, and wait until every process it started has gone (its workers must die with it).
    Returns (its pid, the pid that reached the point, the pids running before the kill: found by
    the barrier folder in their environment, which every descendant inherits)."""
    barrier.hold(barriers, point)
    environment = {**os.environ, barrier.ENVIRONMENT: str(barriers)}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
    try:
        while barrier.reached(barriers, point) is None:
            assert process.poll() is None, f"prepare ended before reaching {point}"
            time.sleep(0.05)
        running = marked(str(barriers))
        assert process.pid in running and len(running) >= 2  # the command and its worker processes
        process.send_signal(signal.SIGKILL)
        process.wait()
        deadline = time.time() + 60  # the kernel kills the orphans at once; this only bounds a failure
        while time.time() < deadline and marked(str(barriers)):
            time.sleep(0.1)
        assert marked(str(barriers)) == [], "worker processes outlived the killed `itl-ray prepare`"
        return process.pid, barrier.reached(barriers, point), running
    finally:
        barrier.release(barriers, point)
        stop(marked(str(barriers)))


def test_resume_after_a_kill_keeps_finished_shards_and_leaves_no_worker(tmp_path, raw_paths):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "itl_ray.cli", "prepare", "imagenet", raw_paths["imagenet"], str(out),
               "--shard-size", "5", "--workers", "1"]
    shards = 40 * (SMALL.train_per_class + SMALL.val_per_class) // 5
    parent, holder, running = _kill_at(command, tmp_path / "barriers", "prepare.shard-00003")
    assert holder in running and holder != parent  # a worker process waited there, and died with its parent
    before = _shard_files(out)
    assert sorted(before) == [f"shard-{index:05d}.arrow" for index in range(3)]  # the worker waited at the 4th
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


def test_selective_search_resumes_after_a_kill_and_gives_the_same_boxes(tmp_path, raw_paths):
    """Killed while waiting to write the 4th of 8 proposals files: the 3 written stay, the rerun
    computes only the other 5 shards' images, and every image's boxes equal those of an
    uninterrupted run with another number of workers."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "itl_ray.cli", "prepare", "voc2007", raw_paths["voc2007"], str(out),
               "--shard-size", "6", "--workers", "2"]
    parent, holder, running = _kill_at(command, tmp_path / "barriers", "prepare.proposals-00003")
    assert holder == parent and len(running) >= 3  # it waited there; its two Selective Search workers ran
    before = _shard_files(out, "proposals")
    assert sorted(before) == [f"proposals-{index:05d}.arrow" for index in range(3)]
    assert len(_shard_files(out)) == 8 and not (out / "PREPARED.json").exists()

    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Selective Search:" in done.stdout and "recall" in done.stdout
    after = _shard_files(out, "proposals")
    assert len(after) == 8 and all(after[name] == mtime for name, mtime in before.items())
    info = json.loads((out / "PREPARED.json").read_text())
    assert info["proposal_timing"]["images"] == SMALL.voc07_trainval + SMALL.voc07_test - 3 * 6

    fresh = tmp_path / "fresh"
    prepare("voc2007", raw_paths["voc2007"], fresh, PrepareSettings(short_side=0, shard_size=6), workers=1)
    resumed, uninterrupted = Prepared(out, "voc2007"), Prepared(fresh, "voc2007")
    for row in range(len(resumed)):
        assert np.array_equal(resumed.proposals(row), uninterrupted.proposals(row))
    assert (json.loads((out / "report.json").read_text())["proposals"]
            == json.loads((fresh / "report.json").read_text())["proposals"])


def test_voc2007_proposals_are_stored_per_image_with_their_recall(mini_paths, raw_paths):
    from itl_ray.proposals import ProposalSettings, RecallCounter, selective_search_jpeg

    data = Prepared(mini_paths["voc2007"], "voc2007")
    report = json.loads((Path(mini_paths["voc2007"]) / "report.json").read_text())
    counter = RecallCounter()
    sizes = {name: data.column(name) for name in ("width", "height")}
    for image in voc_images(data, "trainval") + voc_images(data, "test"):
        row = int(image.path.split()[1])
        boxes = data.proposals(row)
        expected = selective_search_jpeg(image.jpeg, ProposalSettings())
        assert boxes.dtype == np.float32 and np.array_equal(boxes, expected.astype(np.float32))
        assert 0 < len(boxes) <= 2000 and (boxes[:, 2] < sizes["width"][row]).all()
        assert (boxes[:, 3] < sizes["height"][row]).all() and (boxes[:, 2:] - boxes[:, :2] + 1 >= 20).all()
        counter.add(expected, np.array([[v - 1 for v in obj.box] for obj in image.objects if not obj.difficult]))
    assert report["proposals"] == {"settings": ProposalSettings().identity(), **counter.report()}
    assert report["proposals"]["images"] == len(data)
    # The mini-benchmark's objects (non-difficult ones are 26 px and up) are all found.
    assert report["proposals"]["recall_iou_0.5"]["all"]["recall"] == 1.0


def test_a_folder_without_proposals_or_with_foreign_ones_is_prepared_again_in_place(tmp_path, raw_paths):
    out = tmp_path / "out"
    # --no-proposals: as a folder prepared before proposals were stored looks.
    done = itl_ray("prepare", "voc2007", raw_paths["voc2007"], str(out), "--shard-size", "16", "--no-proposals")
    assert done.returncode == 0, done.stderr
    assert "Selective Search" not in done.stdout and not (out / "proposals").exists()
    assert "proposals" not in json.loads((out / "report.json").read_text())
    assert "proposals" not in json.loads((out / "PREPARED.json").read_text())
    images = _shard_files(out)
    again = "run `itl-ray prepare voc2007 ROOT OUT` again"
    with pytest.raises(UserError, match="holds no Selective Search proposals .*" + again):
        Prepared(out, "voc2007").proposals(0)
    done = itl_ray("prepare", "voc2007", raw_paths["voc2007"], str(out), "--shard-size", "16")
    assert done.returncode == 0, done.stderr
    assert _shard_files(out) == images  # the images were kept; only the proposals were made
    assert Prepared(out, "voc2007").proposals(0).shape[1] == 4
    # Proposals of other images (the first file swapped with the second).
    first, second = out / "proposals" / "proposals-00000.arrow", out / "proposals" / "proposals-00001.arrow"
    keep = first.read_bytes()
    first.write_bytes(second.read_bytes())
    with pytest.raises(UserError, match="holds the proposals of other images than the manifest's; " + again):
        Prepared(out, "voc2007").proposals(0)
    done = itl_ray("prepare", "voc2007", raw_paths["voc2007"], str(out), "--shard-size", "16")
    assert done.returncode == 0, done.stderr
    assert first.read_bytes() == keep and json.loads((out / "PREPARED.json").read_text())[
        "proposal_timing"]["images"] == 16


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


@pytest.mark.parametrize("damage", ["truncated shard", "missing manifest"])
def test_prepare_again_mends_a_damaged_folder_in_place(tmp_path, raw_paths, damage):
    out = tmp_path / "out"
    assert itl_ray("prepare", "sun397", raw_paths["sun397"], str(out)).returncode == 0
    whole = Prepared(out, "sun397")
    rows, sums = len(whole), whole.column("sha256")
    shard = out / "shards" / "shard-00000.arrow"
    if damage == "truncated shard":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    else:
        (out / "manifest.parquet").unlink()
    with pytest.raises(UserError):
        Prepared(out, "sun397").verify()
    again = itl_ray("prepare", "sun397", raw_paths["sun397"], str(out))
    assert again.returncode == 0, again.stderr
    said = "shard-00000.arrow is not a readable Arrow file" if damage == "truncated shard" else "manifest.parquet is missing"
    assert f"{out}: " in again.stderr and said in again.stderr and "making what is damaged again" in again.stderr
    mended = Prepared(out, "sun397").verify()
    assert (len(mended), mended.column("sha256")) == (rows, sums)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, mini):
    out = tmp_path / "out"
    assert_one_line_error(itl_ray("prepare", "imagenet", str(tmp_path / "missing"), str(out)),
                          "missing", "does not exist")
    (tmp_path / "a_file").write_text("not a folder")
    assert_one_line_error(itl_ray("prepare", "sun397", str(mini / "SUN397"), str(tmp_path / "a_file" / "out")),
                          "cannot create the output folder", str(tmp_path / "a_file" / "out"))
    assert_one_line_error(itl_ray("prepare", "imagenet", str(tmp_path / "a_file"), str(out)),
                          str(tmp_path / "a_file"), "is a file, not a folder")
    assert (tmp_path / "a_file").read_text() == "not a folder"
    assert_one_line_error(itl_ray("prepare", "sun397", str(tmp_path), str(out), "--no-proposals"),
                          "--no-proposals applies to voc2007 only, not to sun397")
    assert_one_line_error(itl_ray("prepare", "voc2007", str(tmp_path), str(out), "--no-proposals",
                                  "--proposal-ks", "50"), "--proposal-* options were given with --no-proposals")
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


# ---------------------------------------------------------------------------------------------
# VOC annotations that cannot be right, and the real files' quirks


def voc_object(name: str, box, difficult: int = 0, actions: dict | None = None, bndbox: bool = True) -> str:
    """One <object> of a VOC annotation; ``box`` values are written as given (text or numbers)."""
    coordinates = "".join(f"<{tag}>{value}</{tag}>" for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box)
                          if value is not None)
    text = f"<object><name>{name}</name><truncated>0</truncated><difficult>{difficult}</difficult>"
    if bndbox:
        text += f"<bndbox>{coordinates}</bndbox>"
    if actions is not None:
        text += "<actions>" + "".join(f"<{a}>{v}</{a}>" for a, v in actions.items()) + "</actions>"
    return text + "</object>"


def write_voc(root: Path, year: str, images: dict[str, tuple], lists: dict[str, list[str]]) -> Path:
    """A hand-written VOC<year> set under ``root/VOCdevkit``: per image id (declared size or None,
    JPEG size, objects XML); ``lists``: the image-set files' lines. Returns the VOCdevkit folder."""
    base = root / "VOCdevkit" / f"VOC{year}"
    sets = "Main" if year == "2007" else "Action"
    for folder in ("Annotations", "JPEGImages", f"ImageSets/{sets}"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    for image_id, (declared, real, objects) in images.items():
        size = "" if declared is None else (f"<size><width>{declared[0]}</width><height>{declared[1]}</height>"
                                            "<depth>3</depth></size>")
        (base / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.jpg</filename>{size}{objects}</annotation>")
        Image.new("RGB", real, (90, 140, 200)).save(base / "JPEGImages" / f"{image_id}.jpg")
    for split, lines in lists.items():
        (base / "ImageSets" / sets / f"{split}.txt").write_text("".join(f"{line}\n" for line in lines))
    return root / "VOCdevkit"


ONLY = {"jumping": 0, "phoning": 0, "running": 0, "walking": 0, "other": 1}  # flagged "other" only


def test_voc2012_other_persons_are_negatives_and_impossible_person_boxes_are_dropped(tmp_path):
    """A person flagged only "other" is kept with no action (a negative for all ten); a person box
    wholly outside its image (xmin=169, xmax=219 in a 129 px wide image) is dropped and counted,
    and its image stays with no person; the action lists' one line per person give one split."""
    jumping = {**ONLY, "jumping": 1, "other": 0}
    devkit = write_voc(tmp_path, "2012", {
        "2011_000001": ((300, 200), (300, 200), voc_object("person", (10, 10, 100, 190), actions=jumping)
                        + voc_object("person", (150, 20, 260, 199), actions=ONLY)
                        + voc_object("person", (5, 5, 50, 50))),  # a person without <actions>: not scored
        "2011_000002": ((129, 180), (129, 180), voc_object("person", (169, 20, 219, 170), actions=jumping)),
        "2011_000003": ((200, 150), (200, 150), voc_object("person", (20, 10, 120, 140), actions=ONLY)),
    }, {"train": ["2011_000001 1", "2011_000001 2", "2011_000002 1"], "val": ["2011_000003 1"],
        "trainval": ["2011_000001 1", "2011_000001 2", "2011_000002 1", "2011_000003 1"]})
    prepare("voc2012-action", str(devkit), tmp_path / "out", workers=1)
    data = Prepared(tmp_path / "out", "voc2012-action")
    assert data.column("split") == ["train,trainval", "train,trainval", "val,trainval"]  # one clean value each
    train = {image.image_id: image for image in voc_images(data, "train")}
    persons = [(p.box, p.actions) for p in train["2011_000001"].objects]
    assert persons == [((10, 10, 100, 190), ("jumping",)), ((150, 20, 260, 199), ())]
    assert train["2011_000002"].objects == ()
    (val,) = voc_images(data, "val")
    assert [(p.box, p.actions) for p in val.objects] == [((20, 10, 120, 140), ())]
    # The labels a person gets for each action: 1 for "jumping" on the first, 0 everywhere else.
    labels = {action: [int(action in p.actions) for image in train.values() for p in image.objects]
              for action in ("jumping", "phoning", "walking")}
    assert labels == {"jumping": [1, 0], "phoning": [0, 0], "walking": [0, 0]}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["annotations"]["dropped"] == 1 and report["annotations"]["clipped"] == 0
    (note,) = report["annotations"]["files"]["VOC2012/Annotations/2011_000002.xml"]["notes"]
    assert note == "object 1 (person) box (169, 20, 219, 170) lies wholly outside the 129x180 image: dropped"
    train_summary = report["per_split"]["train"]
    assert train_summary["persons"] == 2 and train_summary["per_action"]["jumping"] == 1
    assert train_summary["persons_without_action"] == 1 and train_summary["images_without_persons"] == 1
    assert report["per_split"]["val"]["persons_without_action"] == 1


def test_voc2007_boxes_that_cannot_be_right_are_clipped_or_dropped_and_reported(tmp_path):
    devkit = write_voc(tmp_path, "2007", {
        "000001": ((120, 100), (120, 100),
                   voc_object("dog", (-5, 0, 60, 50))  # partly outside (0-based VOC 2012 style): clipped
                   + voc_object("cat", (100, 90, 130, 140))  # partly outside: clipped to the image
                   + voc_object("bird", (130, 10, 150, 40))  # wholly outside: dropped
                   + voc_object("car", (50, 10, 40, 30))  # xmin > xmax: dropped
                   + voc_object("cow", (5, 5, None, 30))  # no xmax: dropped
                   + voc_object("boat", (0, 0, 0, 0), bndbox=False)  # no <bndbox>: dropped
                   + voc_object("bottle", (10.0, 20.0, 30.0, 40.0))),  # fine (VOC writes some as 273.0)
        "000002": ((500, 375), (80, 60), voc_object("sheep", (10, 10, 70, 50))),  # size disagrees with the JPEG
        "000003": (None, (80, 60), ""),  # no <size> and no objects
        "000004": ((80, 60), (80, 60), voc_object("train", (5, 5, 20, 20), difficult=1)),  # all trains difficult
    }, {"trainval": ["000001", "000002"], "test": ["000003", "000004"]})
    prepare("voc2007", str(devkit), tmp_path / "out", workers=1)
    data = Prepared(tmp_path / "out", "voc2007")
    first, second = voc_images(data, "trainval")
    assert [(obj.name, obj.box) for obj in first.objects] == [
        ("dog", (1, 1, 60, 50)), ("cat", (100, 90, 120, 100)), ("bottle", (10, 20, 30, 40))]
    assert [(obj.name, obj.box) for obj in second.objects] == [("sheep", (10, 10, 70, 50))]
    assert (second.width, second.height) == (80, 60)  # the JPEG's size, not the annotation's 500 x 375
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    annotations = report["annotations"]
    assert (annotations["clipped"], annotations["dropped"], annotations["size_from_jpeg"]) == (2, 4, 2)
    files = annotations["files"]
    assert sorted(files) == ["VOC2007/Annotations/000001.xml", "VOC2007/Annotations/000002.xml",
                             "VOC2007/Annotations/000003.xml"]
    assert files["VOC2007/Annotations/000001.xml"]["clipped"] == 2 and files["VOC2007/Annotations/000001.xml"][
        "dropped"] == 4
    assert files["VOC2007/Annotations/000001.xml"]["notes"] == [
        "object 1 (dog) box (-5, 0, 60, 50) reaches outside the 120x100 image: clipped to (1, 1, 60, 50)",
        "object 2 (cat) box (100, 90, 130, 140) reaches outside the 120x100 image: clipped to (100, 90, 120, 100)",
        "object 3 (bird) box (130, 10, 150, 40) lies wholly outside the 120x100 image: dropped",
        "object 4 (car) box (50, 10, 40, 30) has xmin > xmax: dropped",
        "object 5 (cow) box (5, 5, None, 30) has no complete <bndbox>: dropped",
        "object 6 (boat) box (None, None, None, None) has no complete <bndbox>: dropped"]
    assert files["VOC2007/Annotations/000002.xml"]["notes"] == [
        "the annotation gives the size 500x375, the JPEG is 80x60: boxes checked against the JPEG"]
    assert files["VOC2007/Annotations/000003.xml"]["notes"] == [
        "the annotation gives no size, the JPEG is 80x60: boxes checked against the JPEG"]
    test = report["per_split"]["test"]
    assert test["images_without_objects"] == 1
    assert test["per_class_objects"]["train"] == {"objects": 1, "difficult": 1}
    assert "train" in test["classes_without_positives"] and "dog" in test["classes_without_positives"]
    assert "dog" not in report["per_split"]["trainval"]["classes_without_positives"]
    assert report["proposals"]["images"] == 4  # every stored image has its proposals, objects or not
    assert data.proposals(2).shape[1] == 4


def test_a_utf16_annotation_is_read_by_its_declaration(tmp_path):
    devkit = write_voc(tmp_path, "2007", {
        "000001": ((80, 60), (80, 60), voc_object("dog", (1, 2, 40, 50))),
        "000002": ((80, 60), (80, 60), ""),
    }, {"trainval": ["000001"], "test": ["000002"]})
    xml = devkit / "VOC2007" / "Annotations" / "000001.xml"
    text = xml.read_text().replace("<annotation>", '<?xml version="1.0" encoding="UTF-16"?>\n<annotation>', 1)
    xml.write_bytes(text.replace("dog", "dog").encode("utf-16"))  # with its byte-order mark
    assert xml.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
    (image,) = read_voc2007_detection(str(devkit), "trainval")
    assert [(obj.name, obj.box) for obj in image.objects] == [("dog", (1, 2, 40, 50))]
    prepare("voc2007", str(devkit), tmp_path / "out", workers=1)
    (prepared,) = voc_images(Prepared(tmp_path / "out", "voc2007"), "trainval")
    assert prepared.objects == image.objects


def test_a_huge_sun397_photo_is_kept_and_decoded_in_bounded_memory(tmp_path, mini):
    """A valid 14,000 x 13,000 JPEG (beyond Pillow's decompression-bomb limit) is data: it is stored
    at the usual 256 px, decoded at 1/8 scale (a full decode would take 546 MB for the pixels)."""
    sun = tmp_path / "sun"
    shutil.copytree(mini / "SUN397", sun)
    listed = (sun / "Partitions" / "Training_01.txt").read_text().split()[0]
    huge = sun / listed.lstrip("/")
    Image.new("L", (14000, 13000), 140).save(huge, format="JPEG", quality=80)
    # Peak resident memory of a fresh process (VmHWM: reset by exec, unlike getrusage's maxrss).
    probe = ("import re, sys; from itl_ray.prepare import encode_image; "
             "jpeg, stored, source = encode_image(open(sys.argv[1], 'rb').read(), 256, 90); "
             "peak = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
             "print(stored, source, int(peak) // 1024)")
    done = subprocess.run([sys.executable, "-c", probe, str(huge)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sizes, peak_mb = done.stdout.rsplit(" ", 1)
    assert sizes == "(276, 256) (14000, 13000)" and int(peak_mb) < 250, done.stdout
    prepare("sun397", str(sun), tmp_path / "out", workers=1)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["skipped"] == []
    data = Prepared(tmp_path / "out", "sun397")
    row = data.column("source").index(listed.lstrip("/"))
    assert (data.column("width")[row], data.column("height")[row]) == (276, 256)
    assert (data.column("source_width")[row], data.column("source_height")[row]) == (14000, 13000)
    assert decode_rgb(data.read([row])[0], listed).shape == (3, 256, 276)


def kaggle_imagenet(root: Path) -> Path:
    """The quirky root in Kaggle's layout: images in ILSVRC/Data/CLS-LOC/{train,val} (val flat),
    LOC_val_solution.csv beside ILSVRC/. Returns the CLS-LOC folder."""
    flat_val_imagenet(root / "ILSVRC" / "Data" / "CLS-LOC")
    (root / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\nILSVRC2012_val_00000002,n01443537 1 2 3 4\n"
        "ILSVRC2012_val_00000001,n01440764 5 6 7 8\n")
    return root / "ILSVRC" / "Data" / "CLS-LOC"


def test_kaggle_layout_from_its_root_or_from_cls_loc(tmp_path):
    cls_loc = kaggle_imagenet(tmp_path / "kaggle")
    expected = [("val/ILSVRC2012_val_00000001.JPEG", "n01440764"), ("val/ILSVRC2012_val_00000002.JPEG", "n01443537")]
    for name, root, prefix in (("top", tmp_path / "kaggle", "ILSVRC/Data/CLS-LOC/"), ("cls-loc", cls_loc, "")):
        prepare("imagenet", str(root), tmp_path / name, workers=1)
        data = Prepared(tmp_path / name, "imagenet")
        assert sorted((data.column("source")[r], data.column("label")[r]) for r in data.rows_in("val")) == [
            (prefix + source, label) for source, label in expected]
        assert len(data.rows_in("train")) == 5
    (tmp_path / "kaggle" / "LOC_val_solution.csv").unlink()
    with pytest.raises(UserError) as error:
        prepare("imagenet", str(cls_loc), tmp_path / "none", workers=1)
    message = str(error.value)
    assert f"{cls_loc / 'LOC_val_solution.csv'} or {tmp_path / 'kaggle' / 'LOC_val_solution.csv'}" in message
    assert "ILSVRC2012_devkit_t12" in message and "\n" not in message


def test_proposal_options_of_the_command(tmp_path):
    devkit = write_voc(tmp_path, "2007", {
        "000001": ((200, 150), (200, 150), voc_object("dog", (20, 20, 120, 110))),
        "000002": ((200, 150), (200, 150), voc_object("cat", (60, 30, 190, 140))),
    }, {"trainval": ["000001"], "test": ["000002"]})
    done = itl_ray("prepare", "voc2007", str(devkit), str(tmp_path / "out"), "--proposal-max-boxes", "5",
                   "--proposal-min-side", "30", "--proposal-ks", "80")
    assert done.returncode == 0, done.stderr
    assert "Selective Search:" in done.stdout and "at IoU 0.5" in done.stdout
    data = Prepared(tmp_path / "out", "voc2007")
    for row in range(len(data)):
        boxes = data.proposals(row)
        assert 0 < len(boxes) <= 5 and (boxes[:, 2:] - boxes[:, :2] + 1 >= 30).all()
    settings = json.loads((tmp_path / "out" / "PREPARED.json").read_text())["proposals"]
    assert (settings["max_boxes"], settings["min_box_side"], settings["ks"]) == (5, 30, [80])
    assert_one_line_error(itl_ray("prepare", "voc2007", str(devkit), str(tmp_path / "out2"), "--proposal-max-boxes",
                                  "3000"), "max_boxes must be 1..2000, got 3000")
    assert_one_line_error(itl_ray("prepare", "sun397", str(devkit), str(tmp_path / "out3"), "--proposal-ks", "50"),
                          "--proposal-* options apply to voc2007 only, not to sun397")
    assert_one_line_error(itl_ray("prepare", "voc2007", str(devkit), str(tmp_path / "out4"), "--workers", "0"),
                          "--workers 0", "at least 1")
    assert not any((tmp_path / name).exists() for name in ("out2", "out3", "out4"))
