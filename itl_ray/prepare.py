"""``itl-ray prepare KIND ROOT OUT``: validate a dataset on disk, then write its shards once.

1. Plan: the kind's reader validates the whole dataset (layout, annotations, partitions) and lists
   its images in a fixed order; nothing is written before this succeeds.
2. Encode: images are split into shards of ``shard_size`` plan items; worker processes (all cores)
   decode each source image (JPEG, PNG, grayscale or CMYK), scale its shorter side down to
   ``short_side`` (never up; 0 keeps the size) and store it as an RGB JPEG. Files that cannot be
   decoded (corrupt, truncated) are skipped, counted and listed in the report; preparation goes on.
   Each shard is written atomically, so an interrupted run resumes with the shards it finished.
3. Finish: the manifest (one row per stored image), the report, and ``PREPARED.json`` last, with
   each shard's size and the folder's content hash (``shards.manifest_hash``: what trials are
   identified by, not the folder's path).

The folder's identity (kind, settings, source, the plan's hash) is written first to ``plan.json``:
a folder that holds another dataset or other settings is refused, never mixed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from itl_ray.datasets import Root
from itl_ray.errors import UserError
from itl_ray.files import atomic_path, write_json
from itl_ray.shards import (FORMAT_VERSION, INFO, KINDS, MANIFEST, PLAN, REPORT, SHARDS, manifest_hash, read_shard,
                            shard_path, shard_skipped, write_shard)

# Stored shorter side per kind: ImageNet and SUN397 are trained on 227 px crops of 256 px images
# (Caffe's recipe: images.CAFFE_SHORT_SIDE, which this module does not import to stay free of torch;
# tests/test_crop_plans.py checks they agree); VOC images (at most 500 px) are kept at their size
# for detection and person crops.
DEFAULT_SHORT_SIDE = {"imagenet": 256, "voc2007": 0, "voc2012-action": 0, "sun397": 256}
VOC2007_SPLITS = ("train", "val", "trainval", "test")  # trainval and test are required
VOC2012_SPLITS = ("train", "val", "trainval")  # train and val are required


@dataclass(frozen=True)
class PrepareSettings:
    """How ``itl-ray prepare`` stores images (part of the prepared folder's identity)."""

    short_side: int  # px; 0 keeps every image's size
    quality: int = 90  # JPEG quality of the stored images
    shard_size: int = 1000  # plan items per shard

    def validate(self) -> None:
        """Raise UserError naming the flag (``--short-side``, ``--quality``, ``--shard-size``) of a bad
        value."""
        if self.short_side < 0:
            raise UserError(f"--short-side must be 0 (keep sizes) or a positive number of pixels, got {self.short_side}")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality must be 1..100, got {self.quality}")
        if self.shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {self.shard_size}")


@dataclass(frozen=True)
class Item:
    """One source image of the plan."""

    source: str  # path inside the dataset root
    split: str  # the splits it belongs to, comma-separated (e.g. "train" or "trainval,val")
    label: str = ""  # wnid (ImageNet) or scene (SUN397)
    image_id: str = ""  # VOC image id
    objects: str = ""  # VOC objects as JSON: [name, xmin, ymin, xmax, ymax, difficult, truncated, actions]


def _voc_items(images_by_split: dict[str, list]) -> list[Item]:
    splits: dict[str, list[str]] = {}
    first = {}
    for split, images in images_by_split.items():
        for image in images:
            splits.setdefault(image.image_id, []).append(split)
            first.setdefault(image.image_id, image)
    items = []
    for image_id in sorted(first):
        image = first[image_id]
        objects = [[o.name, *o.box, int(o.difficult), int(o.truncated), list(o.actions)] for o in image.objects]
        items.append(Item(image.path, ",".join(splits[image_id]), image_id=image_id, objects=json.dumps(objects)))
    return items


def plan_items(kind: str, location: str, warnings: list[str] | None = None) -> list[Item]:
    """Validate the dataset at ``location`` and list its images (the kind's reader does the checks).
    Lines about data that is usable but unlike the release (SUN397 partitions of other sizes) are
    appended to ``warnings``."""
    if kind == "imagenet":
        from itl_ray.datasets.imagenet import read_imagenet

        data = read_imagenet(location)
        return ([Item(image.path, "train", image.label) for image in data.train]
                + [Item(image.path, "val", image.label) for image in data.val])
    if kind in ("voc2007", "voc2012-action"):
        from itl_ray.datasets import voc

        root = Root(location, "VOC")
        year, splits, required = (("2007", VOC2007_SPLITS, ("trainval", "test")) if kind == "voc2007"
                                  else ("2012", VOC2012_SPLITS, ("train", "val")))
        base = voc.year_dir(root, year)
        lists = f"{base}/ImageSets/{'Main' if year == '2007' else 'Action'}".lstrip("/")
        present = [s for s in splits if s in required or root.is_file(root.path(f"{lists}/{s}.txt"))]
        read = voc.read_voc2007_detection if kind == "voc2007" else voc.read_voc2012_actions
        return _voc_items({split: read(root, split) for split in present})
    if kind == "sun397":
        from itl_ray.datasets.sun397 import PARTITIONS, read_sun397, size_problem, size_warning

        root = Root(location, "SUN397")
        numbers = [n for n in PARTITIONS if n == 1 or root.is_file(root.path(f"Partitions/Training_{n:02d}.txt"))]
        splits: dict[str, list[str]] = {}
        labels = {}
        problems: dict[str, list[int]] = {}  # partitions whose sizes are not the release's, one line each
        for number in numbers:
            data = read_sun397(root, number, warn=None)
            problem = size_problem((image.label for image in data.train), (image.label for image in data.test))
            if problem:
                problems.setdefault(problem, []).append(number)
            for kind_name, images in (("Training", data.train), ("Testing", data.test)):
                for image in images:
                    splits.setdefault(image.path, []).append(f"{kind_name}_{number:02d}")
                    labels[image.path] = image.label
        if warnings is not None:
            warnings += [size_warning(partitions, problem) for problem, partitions in problems.items()]
        return [Item(path, ",".join(splits[path]), labels[path]) for path in sorted(splits)]
    raise UserError(f"unknown dataset kind {kind!r}; use one of: {', '.join(KINDS)}")


def _plan_hash(items: list[Item]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps(asdict(item), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def encode_image(data: bytes, short_side: int, quality: int) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Source bytes -> (RGB JPEG bytes, stored (width, height), source (width, height)).

    Raises ValueError for a file that is not a decodable image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            source_size = image.size
            target = source_size
            if short_side and min(source_size) > short_side:
                scale = short_side / min(source_size)
                target = (max(short_side, round(source_size[0] * scale)), max(short_side, round(source_size[1] * scale)))
                image.draft("RGB", target)  # JPEG: decode at a reduced scale that stays >= target
            image.load()
            rgb = image.convert("RGB")
            if rgb.size != target:
                rgb = rgb.resize(target, Image.Resampling.BILINEAR, reducing_gap=None)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(str(error) or type(error).__name__) from None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), rgb.size, source_size


def _encode_shard(job: tuple) -> tuple[int, int, int]:
    """Worker: encode one shard's items and write the shard file. Returns (shard, stored, skipped)."""
    location, what, index, items, settings, folder = job
    import warnings

    warnings.simplefilter("ignore")  # PIL's warnings about odd files; failures are reported instead
    root = Root(location, what)
    columns: dict[str, list] = {name: [] for name in ("item", "jpeg", "width", "height", "source_width",
                                                      "source_height", "sha256")}
    skipped = []
    for number, source in items:
        try:
            data = root.read_bytes(root.path(source))
            jpeg, (width, height), (source_width, source_height) = encode_image(data, settings.short_side,
                                                                               settings.quality)
        except (ValueError, OSError) as error:
            skipped.append({"source": source, "reason": str(error).splitlines()[0][:200]})
            continue
        for name, value in (("item", number), ("jpeg", jpeg), ("width", width), ("height", height),
                            ("source_width", source_width), ("source_height", source_height),
                            ("sha256", hashlib.sha256(data).hexdigest())):
            columns[name].append(value)
    write_shard(shard_path(Path(folder), index), columns, skipped)
    return index, len(columns["item"]), len(skipped)


def _claim_folder(out: Path, identity: dict) -> bool:
    """Make ``out`` this preparation's folder. Returns True when it is already complete."""
    if (out / INFO).is_file() or (out / PLAN).is_file():
        existing = json.loads(((out / INFO) if (out / INFO).is_file() else (out / PLAN)).read_text())
        mine = {key: existing.get(key) for key in identity}
        if mine != identity:
            differ = [key for key in identity if mine[key] != identity[key]]
            raise UserError(f"{out} already holds shards of a different dataset or settings ({', '.join(differ)} "
                            f"differ: {mine[differ[0]]!r} there, {identity[differ[0]]!r} now); choose a new folder "
                            "or delete it")
        return (out / INFO).is_file()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an itl_ray prepared folder; choose an empty or new folder")
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    write_json(out / PLAN, identity)
    return False


def prepare(kind: str, location: str, out_dir: str | Path, settings: PrepareSettings | None = None,
            workers: int | None = None, progress: Callable[[int, int, int], None] | None = None) -> dict:
    """Prepare ``kind`` from ``location`` into ``out_dir``; returns the contents of PREPARED.json.

    ``progress(done_items, total_items, skipped)`` is called as shards finish."""
    if kind not in KINDS:
        raise UserError(f"unknown dataset kind {kind!r}; use one of: {', '.join(KINDS)}")
    settings = settings or PrepareSettings(short_side=DEFAULT_SHORT_SIDE[kind])
    settings.validate()
    out = Path(out_dir).expanduser().resolve()
    warnings: list[str] = []
    items = plan_items(kind, location, warnings)
    if not items:
        raise UserError(f"{location} holds no images to prepare")
    source = location if "://" in location else str(Path(location).expanduser().resolve())
    identity = {"format_version": FORMAT_VERSION, "kind": kind, "source": source, "settings": asdict(settings),
                "items": len(items), "plan_hash": _plan_hash(items)}
    if _claim_folder(out, identity):
        return json.loads((out / INFO).read_text())
    for line in warnings:  # the data is usable: said once it is being prepared
        print(line, file=sys.stderr, flush=True)

    started = time.time()
    chunks = [items[start : start + settings.shard_size] for start in range(0, len(items), settings.shard_size)]
    jobs, done = [], 0
    for index, chunk in enumerate(chunks):
        first = index * settings.shard_size
        path = shard_path(out, index)
        if path.is_file():
            try:
                read_shard(path)
                done += len(chunk)
                continue
            except (pa.ArrowInvalid, OSError):
                path.unlink()  # unreadable: make it again
        jobs.append((location, kind, index, [(first + i, item.source) for i, item in enumerate(chunk)], settings,
                     str(out)))
    skipped_count = 0
    if progress:
        progress(done, len(items), 0)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    if jobs:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for index, stored, skipped in pool.map(_encode_shard, jobs):
                done += len(chunks[index])
                skipped_count += skipped
                if progress:
                    progress(done, len(items), skipped_count)
    info = _finish(out, items, len(chunks), identity)
    info["seconds"] = round(time.time() - started, 1)
    write_json(out / INFO, info)
    return info


def _finish(out: Path, items: list[Item], shard_count: int, identity: dict) -> dict:
    """Build the manifest and the report from the shard files; returns PREPARED.json's contents."""
    columns: dict[str, list] = {name: [] for name in ("row", "split", "label", "source", "image_id", "objects",
                                                      "shard", "offset", "width", "height", "source_width",
                                                      "source_height", "sha256")}
    skipped = []
    for index in range(shard_count):
        table = read_shard(shard_path(out, index))
        skipped += shard_skipped(table)
        stored = table.drop_columns(["jpeg"]).to_pydict()
        for offset, number in enumerate(stored["item"]):
            item = items[number]
            columns["row"].append(len(columns["row"]))
            for name in ("split", "label", "source", "image_id", "objects"):
                columns[name].append(getattr(item, name))
            columns["shard"].append(index)
            columns["offset"].append(offset)
            for name in ("width", "height", "source_width", "source_height", "sha256"):
                columns[name].append(stored[name][offset])
    manifest = pa.table(columns)
    with atomic_path(out / MANIFEST) as temporary:
        pq.write_table(manifest, temporary)

    per_split: dict[str, Counter] = {}
    for splits, label in zip(columns["split"], columns["label"]):
        for split in splits.split(","):
            per_split.setdefault(split, Counter())[label or "all"] += 1
    report = {"images": len(columns["row"]), "skipped": skipped,
              "per_split": {split: {"images": sum(c.values()), "per_class": dict(sorted(c.items()))}
                            for split, c in sorted(per_split.items())}}
    write_json(out / REPORT, report)
    return {**identity, "images": report["images"], "skipped": len(skipped), "shards": shard_count,
            "shard_bytes": [shard_path(out, index).stat().st_size for index in range(shard_count)],
            "content_hash": manifest_hash(pq.read_table(out / MANIFEST), identity)}

