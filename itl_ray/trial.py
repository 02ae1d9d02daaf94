"""One trial: choose the subset and labels, pretrain AlexNet, run the three transfer evaluations
(and induction accuracy where enabled).

A trial is a pure function of its config. Its working folder keeps each stage's result (written
atomically), so a rerun of the same config skips finished stages: pretraining resumes from its
last checkpoint, and a finished transfer evaluation is not run again. Stages that return per-image
scores (``transfer.StageOutput``) have them written to ``per_image/<stem>.parquet``.
The folder also holds the trial's record (``RECORD_FILES``): its resolved config, its label set
and its subset.

This module imports neither Ray nor MLflow: ``report`` is how results leave it (Ray Tune in a
sweep, MLflow or the terminal for ``itl-ray trial``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from itl_ray import barrier, label_sets, subsets
from itl_ray.config import TrialConfig, flatten, to_dict, trial_id
from itl_ray.datasets.sun397 import check_partitions, scene_data
from itl_ray.datasets.voc import voc_splits
from itl_ray.errors import UserError
from itl_ray.files import atomic_path, write_atomically, write_json
from itl_ray.image_rows import ImageRows
from itl_ray.metrics import FINAL_METRICS, INDUCTION_METRICS
from itl_ray.models import AlexNet
from itl_ray.pretrain import load_state, plan_schedule, pretrain, top1
from itl_ray.seeds import seeded, stage_seed
from itl_ray.shards import Prepared
from itl_ray.transfer import StageOutput
from itl_ray.transfer.action import evaluate_action
from itl_ray.transfer.detection import evaluate_detection
from itl_ray.transfer.induction import evaluate_induction, induction_data
from itl_ray.transfer.scene import evaluate_scene

# report(kind, payload, step): kind "params" (dict of params), "curve" (training curves such as
# pretrain/loss, step = the stage's iteration or epoch), "checkpoint" (pretraining wrote a
# checkpoint after iteration ``step``: the trial's folder is worth saving), "stage" (a finished
# stage's metrics) or "final" (all final metrics).
Report = Callable[[str, dict, int | None], None]

# The trial's record in its working folder, logged with its MLflow run: the resolved config, the
# label set (``itl-ray labels`` format) and the subset (its images in order, and its hash).
RECORD_FILES = ("config.yaml", "label_set.tsv", "subset.tsv", "subset.json")
# The folder of the per-image test scores (Parquet), logged with the run too: the same name as
# ``itl_ray.per_image.FOLDER`` (not imported: that module needs pandas and scipy, which a bare GPU
# machine running a trial lacks; a test checks the two are equal).
PER_IMAGE = "per_image"
# Config keys recorded under the study's short names (``params``), so each fact is one param.
SHORT_NAMES = {"pretrain.images_per_class": "images_per_class", "pretrain.label_set": "label_set"}


def pick_device(name: str) -> torch.device:
    """The torch device of the ``runtime.device`` setting: auto (CUDA when torch sees a GPU, else
    the CPU), cpu or cuda. Raises UserError for cuda without a GPU, or another name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("runtime.device=cuda, but torch sees no GPU here; use runtime.device=auto or cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"runtime.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


@dataclass
class StageStore:
    """The trial's working folder: a JSON file of finished stages' results, written atomically."""

    folder: Path

    @property
    def path(self) -> Path:
        """``stages.json`` in the working folder."""
        return self.folder / "stages.json"

    def load(self) -> dict:
        """{stage: its result} of the finished stages ({} before the first finishes)."""
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def save(self, stage: str, result: dict) -> None:
        """Add (or replace) one stage's result, rewriting the file atomically (``files.write_json``)."""
        stages = self.load()
        stages[stage] = result
        write_json(self.path, stages)


def label_set_hash(mapping: dict[str, str]) -> str:
    """16 hex digits of SHA-256 over the label set's ``wnid<TAB>group`` lines in its order: two
    trials share it exactly when they train on the same labels."""
    text = "\n".join(f"{wnid}\t{group}" for wnid, group in mapping.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Inputs:
    """Everything a trial reads from disk, validated: the prepared datasets, the subset, the labels."""

    imagenet: Prepared
    full_train_images: int  # training images of the whole prepared set: the schedule's reference
    train_rows: np.ndarray  # manifest rows of the subset's images, class by class
    val_rows: np.ndarray  # manifest rows of the validation images of the subset's classes
    subset: subsets.Subset
    mapping: dict[str, str]  # label set over the subset's classes: wnid -> group wnid
    voc2007: Prepared
    voc2012: Prepared
    sun397: Prepared


@functools.lru_cache(maxsize=16)
def _open(folder: str, kind: str, setting: str) -> Prepared:
    """A prepared dataset, opened and its shards checked (``Prepared.verify``) once per process: a
    sweep validates every trial's inputs in one process."""
    return Prepared(folder, kind, setting).verify()


def read_inputs(config: TrialConfig) -> Inputs:
    """Open every prepared dataset (checking its shards: ``Prepared.verify``), choose the subset and
    the label set, check that the SUN397 partitions the trial asks for were prepared and, when
    detection uses Selective Search, that every VOC 2007 image has its stored proposals
    (``Prepared.check_proposals``), so that a wrong path, a damaged folder or an impossible setting
    fails before any training (the sweep calls this for every trial first, ``itl-ray trial`` before
    its trial)."""
    pre = config.pretrain
    imagenet = _open(config.data.imagenet, "imagenet", "data.imagenet")
    labels = imagenet.column("label")
    train_rows = imagenet.rows_in("train")
    train_labels = [labels[row] for row in train_rows]
    sources = imagenet.column("source")
    # The label set belongs to the data's classes (up_down_127 is a grouping of all 1000); sets
    # that leave classes out (pascal_removed, split halves) limit what the subset draws from.
    full_mapping = label_sets.label_set(pre.label_set, sorted(set(train_labels)))
    subset = subsets.select(train_labels, [subsets.image_key(sources[row]) for row in train_rows],
                            pre.num_classes, pre.images_per_class, config.seed, pre.shortfall,
                            allowed=set(full_mapping))
    chosen = set(subset.classes)
    val_rows = np.array([row for row in imagenet.rows_in("val") if labels[row] in chosen], dtype=np.int64)
    sun397 = _open(config.data.sun397, "sun397", "data.sun397")
    check_partitions(sun397, config.transfer.scene.partitions)
    voc2007 = _open(config.data.voc2007, "voc2007", "data.voc2007")
    if config.transfer.detection.proposals == "selective_search":
        voc2007.check_proposals()  # a folder prepared before proposals were stored is refused here
    return Inputs(
        imagenet=imagenet,
        full_train_images=len(train_rows),
        train_rows=train_rows[list(subset.indices)],
        val_rows=val_rows,
        subset=subset,
        mapping={wnid: full_mapping[wnid] for wnid in subset.classes},
        voc2007=voc2007,
        voc2012=_open(config.data.voc2012, "voc2012-action", "data.voc2012"),
        sun397=sun397,
    )


def write_per_image(workdir: Path, output: StageOutput) -> list[Path]:
    """Write each per-image table of a stage's output to ``<workdir>/per_image/<stem>.parquet``,
    atomically (``files.atomic_path``); returns the paths written."""
    import pyarrow.parquet as pq

    folder = workdir / PER_IMAGE
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, table in output.per_image.items():
        path = folder / f"{stem}.parquet"
        with atomic_path(path) as temporary:
            pq.write_table(table, temporary)
        written.append(path)
    return written


def write_record(config: TrialConfig, inputs: Inputs, folder: Path) -> None:
    """Write the trial's record (``RECORD_FILES``) into ``folder``, each file atomically:
    ``config.yaml`` (the resolved config, as ``config.from_dict`` reads it), ``label_set.tsv``
    (``wnid<TAB>group_wnid`` over the subset's classes), ``subset.tsv`` (``image_key<TAB>wnid
    <TAB>manifest_row``, one row per pretraining image in the subset's order: its hash is the
    first 16 hex digits of the SHA-256 of the image_key column joined by newlines) and
    ``subset.json`` (the hash, the classes in rank order, the counts and the shortfall)."""
    import yaml

    subset = inputs.subset
    sources, labels = inputs.imagenet.column("source"), inputs.imagenet.column("label")
    header = f"# trial {trial_id(config)}: its resolved config\n"
    write_atomically(folder / "config.yaml", header + yaml.safe_dump(to_dict(config), sort_keys=False))
    write_atomically(folder / "label_set.tsv", label_sets.label_set_tsv(inputs.mapping))
    rows = "".join(f"{subsets.image_key(sources[row])}\t{labels[row]}\t{row}\n" for row in inputs.train_rows)
    write_atomically(folder / "subset.tsv", "image_key\twnid\tmanifest_row\n" + rows)
    write_json(folder / "subset.json", {
        "subset_hash": subset.subset_hash if config.pretrain.images_per_class else "none",
        "hash_of": "sha256 of the image_key column of subset.tsv joined by newlines, first 16 hex digits",
        "images": len(inputs.train_rows),
        "images_per_class": config.pretrain.images_per_class,
        "classes": list(subset.classes),
        "shortfall": subset.shortfall,
    })


def trial_params(config: TrialConfig, inputs: Inputs, device: torch.device) -> dict:
    """The trial's params, each fact once: the study's axes under their short names
    (``num_classes``: the classes the network learns to tell apart, i.e. the label set's groups;
    ``source_classes``: the ImageNet classes the subset draws from, the same number for the fine
    label set, 1000 for up_down_127; ``images_per_class``, ``label_set``, ``seed``,
    ``pretrain_images``, ``subset_hash``), the device it ran on, the identity hashes
    (``trial_id``, ``label_set_hash``) and every other setting under its dotted key. Left out:
    ``name``, the sweep's name, which is the MLflow experiment itself; ``runtime.device``, the
    setting (``auto``), for the device used; ``pretrain.num_classes``, the classes asked for, which
    ``source_classes`` resolves. ``data_hash.<setting>`` names each prepared dataset by its content
    (``Prepared.content_hash``), as ``trial_id`` does. With pretraining, the schedule the settings
    resolve to for this subset (``pretrain.plan_schedule``): ``pretrain_iterations``,
    ``pretrain_epochs`` (passes over the subset, 2 decimals) and ``pretrain_lr_step``."""
    subset, pre = inputs.subset, config.pretrain
    settings = flatten(to_dict(config))
    params = {
        **{key: value for key, value in settings.items()
           if key not in (*SHORT_NAMES, "name", "runtime.device", "pretrain.num_classes")},
        **{short: settings[key] for key, short in SHORT_NAMES.items()},
        "trial_id": trial_id(config),
        **{f"data_hash.{setting}": data.content_hash for setting, data in
           (("imagenet", inputs.imagenet), ("voc2007", inputs.voc2007), ("voc2012", inputs.voc2012),
            ("sun397", inputs.sun397))},
        "num_classes": len(set(inputs.mapping.values())),
        "source_classes": len(subset.classes),
        "label_set_hash": label_set_hash(inputs.mapping),
        "subset_hash": subset.subset_hash if pre.images_per_class else "none",
        "pretrain_images": len(inputs.train_rows),
        "shortfall_classes": len(subset.shortfall),
        "shortfall_images": sum(subset.shortfall.values()),
        "device": device.type,
    }
    if pre.images_per_class:  # the schedule the settings resolve to for this subset
        schedule = plan_schedule(pre, len(inputs.train_rows), inputs.full_train_images)
        params.update(pretrain_iterations=schedule.iterations, pretrain_epochs=round(schedule.epochs, 2),
                      pretrain_lr_step=schedule.lr_step)
    return params


def run_trial(config: TrialConfig, workdir: Path, report: Report, log: Callable[[str], None] = print) -> dict:
    """Run (or finish) one trial in ``workdir``; returns its final metrics in percent.

    Seeds: the subset is drawn from ``config.seed``; each stage gets its own seed,
    ``seeds.stage_seed(config.seed, stage)`` for "init" (the initial weights), "pretrain" (order,
    crops, dropout), "detection", "action" and "scene", and runs with torch's global generators seeded
    from it and restored afterwards (``seeds.seeded``). So no stage depends on the draws of the
    stages before it, and a trial resumed after any epoch or stage ends with the same numbers as
    one that ran through (bit-identical on a CPU).

    Fault points (``barrier.reach``, inert unless a test arms them): after each pretraining
    checkpoint's report ``<trial_id>.pretrain-iteration-<I>``, and ``<trial_id>.pretrain-epoch-<N>``
    when the checkpoint ends epoch N; ``<trial_id>.<stage>-done`` after a transfer stage's report."""
    started = time.time()
    runtime = config.runtime
    if runtime.threads:
        torch.set_num_threads(runtime.threads)
    device = pick_device(runtime.device)
    workdir.mkdir(parents=True, exist_ok=True)
    store = StageStore(workdir)
    stages = store.load()

    inputs = read_inputs(config)
    write_record(config, inputs, workdir)
    mapping = inputs.mapping
    pre = config.pretrain
    groups = sorted(set(mapping.values()))
    group_index = {group: i for i, group in enumerate(groups)}
    params = trial_params(config, inputs, device)
    report("params", params, None)
    tid = params["trial_id"]

    def curve(metrics: dict[str, float], step: int) -> None:  # a stage's training curves (pretrain/loss, ...)
        report("curve", metrics, step)

    def on_checkpoint(iteration: int) -> None:  # a pretraining checkpoint is on disk
        report("checkpoint", {}, iteration)
        barrier.reach(f"{tid}.pretrain-iteration-{iteration}", log)
        if iteration % batches_per_epoch == 0:
            barrier.reach(f"{tid}.pretrain-epoch-{iteration // batches_per_epoch}", log)

    batches_per_epoch = plan_schedule(pre, len(inputs.train_rows), inputs.full_train_images).batches_per_epoch \
        if pre.images_per_class else 1
    pretrain_seed = stage_seed(config.seed, "pretrain")
    with seeded(stage_seed(config.seed, "init")):  # the initial weights (loaded below when pretrained earlier)
        model = AlexNet(len(groups), width=config.model.width, resolution=config.model.resolution,
                        variant=config.model.variant, init=config.model.init)
    backbone_file = workdir / "backbone.pt"
    labels = inputs.imagenet.column("label")
    if "pretrain" in stages and backbone_file.is_file():
        model.load_state_dict(load_state(backbone_file, "pretrained weights"))
        log("pretrain: done earlier, weights loaded")
    else:
        stage_started = time.time()
        log(f"trial {params['trial_id']}: {len(groups)} classes, {len(inputs.train_rows)} images, device {device}")

        def images(rows: np.ndarray) -> ImageRows:  # shard rows with their (label set's) class index
            return ImageRows(inputs.imagenet, rows, [group_index[mapping[labels[row]]] for row in rows])

        if pre.images_per_class == 0:
            result = {"pretrain_top1": 100 * top1(model, images(inputs.val_rows), pre, device, runtime.pretrain)}
            log(f"pretrain: none (random initialisation), val top-1 {result['pretrain_top1']:.1f}%")
        else:
            with seeded(pretrain_seed):  # dropout; a resumed run restores the generator's state
                result = pretrain(
                    model, images(inputs.train_rows), images(inputs.val_rows), pre, device, pretrain_seed,
                    workdir / "pretrain.pt", full_images=inputs.full_train_images, curve=curve,
                    on_checkpoint=on_checkpoint, log=log, runtime=runtime.pretrain,
                )
        with atomic_path(backbone_file) as temporary:
            torch.save(model.cpu().state_dict(), temporary)
        result["seconds/pretrain"] = time.time() - stage_started
        store.save("pretrain", result)
        stages = store.load()
        # The weights and the stage's result are kept; the pretraining checkpoint (weights, optimizer,
        # generators) is needed no more, and the sweep's checkpoints need not carry it.
        (workdir / "pretrain.pt").unlink(missing_ok=True)
        report("stage", result, None)
    model.to(device)

    transfer = config.transfer
    transfers = {
        "detection": lambda seed: evaluate_detection(model, voc_splits(inputs.voc2007, "trainval", "test"),
                                                     transfer.detection, device, seed, log=log, curve=curve,
                                                     runtime=runtime.detection),
        "action": lambda seed: evaluate_action(model, voc_splits(inputs.voc2012, "train", "val"),
                                               transfer.action, device, seed, log=log, curve=curve,
                                               runtime=runtime.action),
        "scene": lambda seed: evaluate_scene(model, [scene_data(inputs.sun397, p) for p in transfer.scene.partitions],
                                             transfer.scene, device, seed, log=log, curve=curve,
                                             runtime=runtime.scene),
    }
    if transfer.induction.enabled:
        transfers["induction"] = lambda seed: evaluate_induction(
            model, induction_data(inputs.imagenet, inputs.subset.classes, transfer.induction.train_per_class, config.seed,
                                  pre.label_set, len(groups) if pre.images_per_class else 0),
            transfer.induction, device, seed, log=log, curve=curve, runtime=runtime.induction)
    for stage, evaluate in transfers.items():
        if stage in stages:
            log(f"{stage}: done earlier")
            continue
        stage_started = time.time()
        seed = stage_seed(config.seed, stage)
        with seeded(seed):  # whatever the stage draws from torch's global generators
            output = evaluate(seed)
        if isinstance(output, StageOutput):
            write_per_image(workdir, output)
            result = dict(output.metrics)
        else:
            result = dict(output)
        result[f"seconds/{stage}"] = time.time() - stage_started
        store.save(stage, result)  # after its per-image tables: a stage marked done has them on disk
        stages = store.load()
        report("stage", result, None)  # a sweep checkpoints the folder here: a retry skips this stage
        barrier.reach(f"{tid}.{stage}-done", log)

    final = {key: value for stage in ("pretrain", *transfers) for key, value in stages[stage].items()}
    final["seconds/trial"] = time.time() - started
    report("final", final, None)
    headline = [key for key in (*FINAL_METRICS, *INDUCTION_METRICS) if key in final]
    log("trial: " + ", ".join(f"{key} {final[key]:.1f}" for key in headline))
    return final
