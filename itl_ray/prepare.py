"""``itl-ray prepare KIND ROOT OUT``: validate a dataset on disk, then write its shards once.

1. Plan: the kind's reader validates the whole dataset (layout, annotations, partitions) and lists
   its images in a fixed order; nothing is written before this succeeds.
2. Encode: images are split into shards of ``shard_size`` plan items; worker processes (all cores)
   decode each source image (JPEG, PNG, grayscale or CMYK), scale its shorter side down to
   ``short_side`` (never up; 0 keeps the size) and store it as an RGB JPEG. Large photos are
   decoded at a reduced scale (JPEG draft mode) so memory stays bounded. Files that cannot be
   decoded (corrupt, truncated) are skipped, counted and listed in the report with the file and
   the cause; preparation goes on. Each shard is written atomically, so an interrupted run resumes
   with the shards it finished.
3. Proposals (VOC 2007): Selective Search (``itl_ray.proposals``) on every stored image, in worker
   processes, one proposals file per image shard, written atomically in shard order: an
   interrupted run redoes no finished proposals file.
4. Finish: VOC boxes checked against the JPEG's real size (``voc.check_boxes``: clipped or
   dropped, each case reported per annotation file), the manifest (one row per stored image), the
   report, and ``PREPARED.json`` last, with each shard's size and the folder's content hash
   (``shards.manifest_hash``: what trials are identified by, not the folder's path).

Worker processes die with the process that started them (``PR_SET_PDEATHSIG`` on Linux), so a
killed ``itl-ray prepare`` leaves none behind.

The folder's identity (kind, settings, source, the plan's hash, VOC 2007's proposal settings) is
written first to ``plan.json``: a folder that holds another dataset or other settings is refused,
never mixed. A VOC 2007 folder prepared before proposals were stored is completed in place.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from itl_ray import barrier
from itl_ray.datasets import Root
from itl_ray.errors import UserError
from itl_ray.files import atomic_path, write_json
from itl_ray.progress import Progress
from itl_ray.proposals import ProposalSettings, RecallCounter
from itl_ray.shards import (FORMAT_VERSION, INFO, KINDS, MANIFEST, PLAN, PROPOSALS, REPORT, SHARDS, manifest_hash,
                            proposals_path, read_proposals, read_shard, shard_path, shard_skipped, write_proposals,
                            write_shard)

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
    # VOC: the image size the annotation declares, "WxH" ("0x0" when it does not). Only what the
    # report says depends on it (boxes are checked against the JPEG's size), so it is left out of
    # the plan's hash.
    declared_size: str = ""


def _voc_items(images_by_split: dict[str, list]) -> list[Item]:
    splits: dict[str, list[str]] = {}
    first = {}
    for split, images in images_by_split.items():
        for image in images:
            if split not in splits.setdefault(image.image_id, []):
                splits[image.image_id].append(split)
            first.setdefault(image.image_id, image)
    items = []
    for image_id in sorted(first):
        image = first[image_id]
        objects = [[o.name, *o.box, int(o.difficult), int(o.truncated), list(o.actions)] for o in image.objects]
        items.append(Item(image.path, ",".join(splits[image_id]), image_id=image_id, objects=json.dumps(objects),
                          declared_size=f"{image.width}x{image.height}"))
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
        fields = asdict(item)
        del fields["declared_size"]  # see Item
        digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()[:16]


# The most pixels decoded at once: Pillow's own decompression-bomb threshold (2 x its
# MAX_IMAGE_PIXELS). A JPEG larger than this is still read (draft mode decodes it at 1/2, 1/4 or
# 1/8 scale when it is stored smaller); only an image that would need more memory is skipped.
MAX_DECODED_PIXELS = 2 * 89_478_485
_MEMORY_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def _cause(error: BaseException) -> str:
    """An error as one short line, without Python object reprs (``<_io.BytesIO object at 0x...>``)."""
    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image file Pillow can read (unknown format or corrupt header)"
    text = _MEMORY_ADDRESS.sub("", (str(error).splitlines() or [""])[0]).strip()
    return text[:200] or type(error).__name__


def encode_image(data: bytes, short_side: int, quality: int) -> tuple[bytes, tuple[int, int], tuple[int, int]]:
    """Source bytes -> (RGB JPEG bytes, stored (width, height), source (width, height)).

    A JPEG is decoded in draft mode at the smallest DCT scale (1/1 to 1/8) that still covers the
    stored size, so a 14,000 x 13,000 photo stored at 256 px decodes at about 1,750 x 1,625 and
    memory stays bounded; Pillow's decompression-bomb refusal (meant for untrusted uploads) is
    replaced by that bound (``MAX_DECODED_PIXELS`` decoded at once). Raises ValueError, one line
    naming the cause, for a file that is not a decodable image or too large to decode."""
    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the bound is MAX_DECODED_PIXELS, checked after draft below
    try:
        with Image.open(io.BytesIO(data)) as image:
            source_size = image.size
            target = source_size
            if short_side and min(source_size) > short_side:
                scale = short_side / min(source_size)
                target = (max(short_side, round(source_size[0] * scale)), max(short_side, round(source_size[1] * scale)))
                image.draft("RGB", target)  # JPEG: decode at a reduced scale that stays >= target
            if image.size[0] * image.size[1] > MAX_DECODED_PIXELS:
                raise ValueError(f"{image.format or 'image'} of {source_size[0]}x{source_size[1]} px would decode "
                                 f"at {image.size[0]}x{image.size[1]}, over {MAX_DECODED_PIXELS:,} px at once")
            image.load()
            rgb = image.convert("RGB")
            if rgb.size != target:
                rgb = rgb.resize(target, Image.Resampling.BILINEAR, reducing_gap=None)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(_cause(error)) from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), rgb.size, source_size


def _init_worker(parent: int, opencv: bool) -> None:
    """Worker processes die with the process that started them: on Linux the kernel sends SIGKILL
    when the parent dies (``prctl(PR_SET_PDEATHSIG)``); a parent already gone ends the worker at
    once. With ``opencv``, one OpenCV thread per worker: the work is spread over processes."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
    if opencv:
        import cv2

        cv2.setNumThreads(1)


def _pool(workers: int, opencv: bool = False) -> ProcessPoolExecutor:
    """Worker processes (see ``_init_worker``). Those that run OpenCV are started fresh ("spawn"),
    not forked: a child forked from a process whose OpenCV thread pool has run (a caller that
    used Selective Search itself) inherits that pool's locks held and waits on them for ever."""
    context = multiprocessing.get_context("spawn") if opencv else None
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                               initargs=(os.getpid(), opencv))


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
        except OSError as error:
            skipped.append({"source": source, "reason": f"{source} cannot be read: {_cause(error)}"})
            continue
        try:
            jpeg, (width, height), (source_width, source_height) = encode_image(data, settings.short_side,
                                                                               settings.quality)
        except ValueError as error:
            skipped.append({"source": source, "reason": f"{source} cannot be decoded: {error}"})
            continue
        for name, value in (("item", number), ("jpeg", jpeg), ("width", width), ("height", height),
                            ("source_width", source_width), ("source_height", source_height),
                            ("sha256", hashlib.sha256(data).hexdigest())):
            columns[name].append(value)
    barrier.reach(f"prepare.shard-{index:05d}", log=lambda line: None)
    write_shard(shard_path(Path(folder), index), columns, skipped)
    return index, len(columns["item"]), len(skipped)


_OPEN_SHARD: dict[str, pa.Table] = {}  # a worker's last opened shard (its chunks come in order)


def _proposals_chunk(job: tuple) -> tuple[int, list[int], list, float]:
    """Worker: Selective Search on some stored images of one shard. Returns (shard, offsets, boxes
    per image, CPU seconds spent)."""
    from itl_ray.proposals import selective_search_jpeg

    folder, index, offsets, settings = job
    path = str(shard_path(Path(folder), index))
    if path not in _OPEN_SHARD:
        _OPEN_SHARD.clear()
        _OPEN_SHARD[path] = read_shard(Path(path))
    jpegs = _OPEN_SHARD[path].column("jpeg")
    started = time.process_time()
    boxes = [selective_search_jpeg(jpegs[offset].as_py(), settings) for offset in offsets]
    return index, offsets, boxes, time.process_time() - started


def _damage(out: Path, kind: str) -> str | None:
    """What is wrong with the finished folder ``out`` (``Prepared.verify``: the manifest, each
    shard's footer, columns, rows and size), as ``<folder>: <file> ...; making what is damaged
    again``; None when it is whole."""
    from itl_ray.shards import Prepared

    try:
        Prepared(out, kind, again="making what is damaged again").verify()
    except UserError as error:
        return str(error)
    return None


def _claim_folder(out: Path, identity: dict) -> bool:
    """Make ``out`` this preparation's folder. Returns True when it is already complete."""
    if (out / INFO).is_file() or (out / PLAN).is_file():
        existing = json.loads(((out / INFO) if (out / INFO).is_file() else (out / PLAN)).read_text())
        mine = {key: existing.get(key) for key in identity}
        if "proposals" in identity and mine["proposals"] is None and {**mine, "proposals": identity["proposals"]} == identity:
            # Prepared before proposals were stored: its shards are this plan's; add the proposals.
            write_json(out / PLAN, identity)
            (out / INFO).unlink(missing_ok=True)
            return False
        if mine != identity:
            differ = [key for key in identity if mine[key] != identity[key]]
            raise UserError(f"{out} already holds shards of a different dataset or settings ({', '.join(differ)} "
                            f"differ: {mine[differ[0]]!r} there, {identity[differ[0]]!r} now); choose a new folder "
                            "or delete it")
        return (out / INFO).is_file()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an itl_ray prepared folder; choose an empty or new folder")
    made = not out.exists()
    try:
        (out / SHARDS).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output folder {out} ({error.strerror or error}); choose a folder "
                        "you can write to") from None
    try:
        write_json(out / PLAN, identity)
    except OSError:
        if made:  # a folder without its plan would be refused next time: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    return False


def prepare(kind: str, location: str, out_dir: str | Path, settings: PrepareSettings | None = None,
            workers: int | None = None, progress: Callable[[int, int, int], None] | None = None,
            proposal_settings: ProposalSettings | None = None, proposals: bool = True) -> dict:
    """Prepare ``kind`` from ``location`` into ``out_dir``; returns the contents of PREPARED.json.

    ``progress(done_items, total_items, skipped)`` is called as image shards finish; Selective
    Search (VOC 2007 only; ``proposal_settings``, default ``ProposalSettings()``) shows its own
    progress line on standard error. ``proposals=False`` (VOC 2007) stores no proposals: such a
    folder serves ``transfer.detection.proposals: sliding_window`` only, and preparing it again
    with proposals adds them in place."""
    if kind not in KINDS:
        raise UserError(f"unknown dataset kind {kind!r}; use one of: {', '.join(KINDS)}")
    settings = settings or PrepareSettings(short_side=DEFAULT_SHORT_SIDE[kind])
    settings.validate()
    if kind != "voc2007" and (proposal_settings is not None or not proposals):
        raise UserError(f"proposal settings apply to voc2007 only, not to {kind}")
    if not proposals and proposal_settings is not None:
        raise UserError("proposal settings were given with proposals turned off; give one or the other")
    if kind == "voc2007" and proposals:
        proposal_settings = proposal_settings or ProposalSettings()
        proposal_settings.validate()
    out = Path(out_dir).expanduser().resolve()
    warnings: list[str] = []
    items = plan_items(kind, location, warnings)
    if not items:
        raise UserError(f"{location} holds no images to prepare")
    source = location if "://" in location else str(Path(location).expanduser().resolve())
    identity = {"format_version": FORMAT_VERSION, "kind": kind, "source": source, "settings": asdict(settings),
                "items": len(items), "plan_hash": _plan_hash(items)}
    if proposal_settings is not None:
        identity["proposals"] = proposal_settings.identity()
    chunks = [items[start : start + settings.shard_size] for start in range(0, len(items), settings.shard_size)]
    if _claim_folder(out, identity):
        damage = _damage(out, kind)
        if damage is None and (proposal_settings is None or not _proposal_jobs(out, len(chunks))):
            return json.loads((out / INFO).read_text())
        if damage is not None:
            print(damage, file=sys.stderr, flush=True)
        # Damaged, or proposals missing or of other images: unreadable shards and missing proposals
        # are made again below, and the manifest and PREPARED.json are rebuilt from the shards.
        (out / INFO).unlink()
    for line in warnings:  # the data is usable: said once it is being prepared
        print(line, file=sys.stderr, flush=True)

    started = time.time()
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
    workers = max(1, workers or os.cpu_count() or 1)
    if jobs:
        with _pool(min(workers, len(jobs))) as pool:
            for index, stored, skipped in pool.map(_encode_shard, jobs):
                done += len(chunks[index])
                skipped_count += skipped
                if progress:
                    progress(done, len(items), skipped_count)
    timing = _compute_proposals(out, len(chunks), proposal_settings, workers) if proposal_settings else None
    info = _finish(out, items, len(chunks), identity)
    info["seconds"] = round(time.time() - started, 1)
    if timing:
        info["proposal_timing"] = timing
    write_json(out / INFO, info)
    return info


def _proposal_jobs(out: Path, shard_count: int) -> list[tuple[int, list[int], list[str]]]:
    """(shard, items, checksums) of every image shard whose proposals file is missing, unreadable
    or made for other images (those files are removed)."""
    todo = []
    (out / PROPOSALS).mkdir(exist_ok=True)
    for index in range(shard_count):
        shard = read_shard(shard_path(out, index))
        items, sums = shard.column("item").to_pylist(), shard.column("sha256").to_pylist()
        path = proposals_path(out, index)
        try:
            table = read_proposals(path)
            if table.column("item").to_pylist() == items and table.column("sha256").to_pylist() == sums:
                continue
        except FileNotFoundError:
            pass
        except (pa.ArrowInvalid, OSError):
            pass
        path.unlink(missing_ok=True)
        todo.append((index, items, sums))
    return todo


PROPOSAL_CHUNK = 4  # images per worker task: small, so all cores stay busy to the end


def _compute_proposals(out: Path, shard_count: int, settings: ProposalSettings, workers: int) -> dict | None:
    """Selective Search on every stored image whose shard has no valid proposals file yet; files
    are written in shard order (a file is complete or absent). Returns the CPU time per image
    (None when there was nothing to do)."""
    todo = _proposal_jobs(out, shard_count)
    total = sum(len(items) for _, items, _ in todo)
    if not total:
        return None
    pending: dict[int, list] = {}  # shard -> boxes per offset (None until computed)
    left: dict[int, int] = {}
    tasks = []
    for index, items, _ in todo:
        pending[index], left[index] = [None] * len(items), len(items)
        offsets = list(range(len(items)))
        tasks += [(str(out), index, offsets[start : start + PROPOSAL_CHUNK], settings)
                  for start in range(0, len(offsets), PROPOSAL_CHUNK)]
    order = [index for index, _, _ in todo]
    meta = {index: (items, sums) for index, items, sums in todo}
    cpu_seconds = 0.0
    progress = Progress("prepare voc2007: selective search", total, "images")
    with _pool(min(workers, len(tasks)), opencv=True) as pool:
        running = {pool.submit(_proposals_chunk, task) for task in tasks}
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                index, offsets, boxes, seconds = future.result()
                cpu_seconds += seconds
                for offset, image_boxes in zip(offsets, boxes):
                    pending[index][offset] = image_boxes
                left[index] -= len(offsets)
                progress.update(len(offsets))
            while order and left[order[0]] == 0:  # write finished files in shard order
                index = order.pop(0)
                barrier.reach(f"prepare.proposals-{index:05d}", log=lambda line: None)
                write_proposals(proposals_path(out, index), *meta[index], pending.pop(index))
    progress.close()
    return {"images": total, "cpu_seconds_per_image": round(cpu_seconds / total, 3), "workers": min(workers, len(tasks))}


def _finish(out: Path, items: list[Item], shard_count: int, identity: dict) -> dict:
    """Build the manifest and the report from the shard files (VOC boxes checked against each
    JPEG's real size on the way); returns PREPARED.json's contents."""
    from itl_ray.datasets import voc

    kind = identity["kind"]
    is_voc = kind in ("voc2007", "voc2012-action")
    columns: dict[str, list] = {name: [] for name in ("row", "split", "label", "source", "image_id", "objects",
                                                      "shard", "offset", "width", "height", "source_width",
                                                      "source_height", "sha256")}
    skipped = []
    annotations = {"clipped": 0, "dropped": 0, "size_from_jpeg": 0, "files": {}}
    checked: list[list] = []  # VOC: each row's objects after check_boxes
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
            if is_voc:
                real = (stored["source_width"][offset], stored["source_height"][offset])
                objects, notes, counts = voc.check_boxes(json.loads(item.objects), *real)
                if item.declared_size != f"{real[0]}x{real[1]}":
                    declared = "no size" if item.declared_size in ("", "0x0") else f"the size {item.declared_size}"
                    notes.insert(0, f"the annotation gives {declared}, the JPEG is {real[0]}x{real[1]}: boxes "
                                    "checked against the JPEG")
                    annotations["size_from_jpeg"] += 1
                if notes:
                    annotations["files"][voc.annotation_path(item.source, item.image_id)] = {
                        "clipped": counts["clipped"], "dropped": counts["dropped"], "notes": notes}
                annotations["clipped"] += counts["clipped"]
                annotations["dropped"] += counts["dropped"]
                columns["objects"][-1] = json.dumps(objects)
                checked.append(objects)
    manifest = pa.table(columns)
    with atomic_path(out / MANIFEST) as temporary:
        pq.write_table(manifest, temporary)

    per_split: dict[str, Counter] = {}
    rows_of: dict[str, list[int]] = {}
    for row, (splits, label) in enumerate(zip(columns["split"], columns["label"])):
        for split in splits.split(","):
            per_split.setdefault(split, Counter())[label or "all"] += 1
            rows_of.setdefault(split, []).append(row)
    report = {"images": len(columns["row"]), "skipped": skipped,
              "per_split": {split: {"images": sum(c.values()), "per_class": dict(sorted(c.items()))}
                            for split, c in sorted(per_split.items())}}
    if is_voc:
        report["annotations"] = annotations
        for split, rows in rows_of.items():
            report["per_split"][split].update(voc.split_summary([checked[row] for row in rows],
                                                                actions=kind == "voc2012-action"))
    if "proposals" in identity:
        report["proposals"] = {"settings": identity["proposals"],
                               **_proposal_recall(out, shard_count, manifest, checked)}
    write_json(out / REPORT, report)
    return {**identity, "images": report["images"], "skipped": len(skipped), "shards": shard_count,
            "shard_bytes": [shard_path(out, index).stat().st_size for index in range(shard_count)],
            "content_hash": manifest_hash(pq.read_table(out / MANIFEST), identity)}


def _proposal_recall(out: Path, shard_count: int, manifest: pa.Table, objects: list[list]) -> dict:
    """Boxes per image and the recall of the non-difficult objects (``proposals.RecallCounter``),
    ground truth scaled to the stored images as the detection stage sees it."""
    import numpy as np

    from itl_ray.datasets.voc import stored_box

    sizes = {name: manifest.column(name).to_pylist() for name in ("width", "height", "source_width", "source_height")}
    counter = RecallCounter()
    row = 0
    for index in range(shard_count):
        table = read_proposals(proposals_path(out, index))
        for boxes in table.column("boxes").to_numpy(zero_copy_only=False):
            sx, sy = sizes["width"][row] / sizes["source_width"][row], sizes["height"][row] / sizes["source_height"][row]
            ground_truth = [[value - 1 for value in stored_box(obj[1:5], sx, sy)] for obj in objects[row] if not obj[5]]
            counter.add(np.asarray(boxes, dtype=np.int64).reshape(-1, 4), np.asarray(ground_truth).reshape(-1, 4))
            row += 1
    return counter.report()
