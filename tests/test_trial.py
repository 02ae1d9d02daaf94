"""One trial in-process (no Ray, no MLflow): stages, reports, and resuming a finished stage."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from itl_ray.config import load_spec
from itl_ray.image_rows import ImageRows
from itl_ray.metrics import FINAL_METRICS
from itl_ray.models import AlexNet
from itl_ray.pretrain import top1
from itl_ray.trial import read_inputs, run_trial
from tests.conftest import tiny_spec


def assert_final_metrics_are_the_stages_results(config, work, final, reports):
    """Each headline metric is what its stage reported; mAPs are the means of their classes' APs;
    pretrain_top1 is the saved backbone's top-1 on the subset's validation images, measured again."""
    stages = [payload for kind, payload, _ in reports if kind == "stage"]
    for metric, prefix in (("voc07_det_map", "voc07_det_ap/"), ("voc12_act_map", "voc12_act_ap/"),
                           ("sun397_acc", None)):
        (stage,) = [payload for payload in stages if metric in payload]
        assert final[metric] == stage[metric]
        if prefix:
            aps = [value for key, value in stage.items() if key.startswith(prefix)]
            assert aps and stage[metric] == pytest.approx(sum(aps) / len(aps))
    inputs = read_inputs(config)
    groups = sorted(set(inputs.mapping.values()))
    labels = inputs.imagenet.column("label")
    val = ImageRows(inputs.imagenet, inputs.val_rows, [groups.index(inputs.mapping[labels[row]])
                                                       for row in inputs.val_rows])
    model = AlexNet(len(groups), width=config.model.width, resolution=config.model.resolution,
                    variant=config.model.variant, init=config.model.init)
    model.load_state_dict(torch.load(work / "backbone.pt", weights_only=True))
    assert final["pretrain_top1"] == 100 * top1(model, val, config.pretrain, torch.device("cpu"))


def test_trial_runs_every_stage_and_resumes(tmp_path, mini_paths):
    config = load_spec(tiny_spec(tmp_path / "tiny.yaml", mini_paths)).trials()[0]
    reports = []
    lines = []
    final = run_trial(config, tmp_path / "work", lambda kind, payload, step: reports.append((kind, payload, step)),
                      log=lines.append)
    assert_final_metrics_are_the_stages_results(config, tmp_path / "work", final, reports)
    kinds = [kind for kind, _, _ in reports if kind != "curve"]
    assert kinds == ["params", "checkpoint", "checkpoint", "stage", "stage", "stage", "stage", "final"]
    stages = [payload for kind, payload, _ in reports if kind == "stage"]
    assert "pretrain_top1" in stages[0] and "voc07_det_map" in stages[1] and "sun397_acc" in stages[3]
    assert [sorted(key for key in stage if key.startswith("seconds/")) for stage in stages] == [
        ["seconds/pretrain"], ["seconds/detection"], ["seconds/action"], ["seconds/scene"]]
    assert "seconds/trial" in final
    # Training curves of the region-based stages, step = iterations done (12 and 10 here).
    curves = [(payload, step) for kind, payload, step in reports if kind == "curve"]
    assert [step for payload, step in curves if "detection/loss" in payload] == [12]
    assert [step for payload, step in curves if "action/loss" in payload] == [10]
    # Per-image test scores, as the contract names them, beside the stage results.
    import pyarrow.parquet as pq

    folder = tmp_path / "work" / "per_image"
    assert sorted(path.name for path in folder.iterdir()) == [
        "sun397_predictions.parquet", "voc07_det_detections.parquet", "voc07_det_positives.parquet",
        "voc12_act_scores.parquet"]
    assert pq.read_table(folder / "voc07_det_positives.parquet").num_rows == 20 * 24  # classes x test images
    # The report recomputes each metric from them: with every image once, exactly the logged value.
    import numpy as np

    from itl_ray import per_image
    from itl_ray.trial import PER_IMAGE

    assert PER_IMAGE == per_image.FOLDER
    for metric in ("voc07_det_map", "voc12_act_map"):
        task = per_image.load_task(metric, folder)
        assert task.metric(np.ones((1, len(task.images))))[0] == final[metric]
    params = reports[0][1]
    assert params["num_classes"] == 4 and params["images_per_class"] == 8 and params["pretrain_images"] == 32
    assert len(params["subset_hash"]) == 16 and params["label_set"] == "fine"
    # 32 images in batches of 16, 2 epochs (the tiny spec: same_epochs): 4 iterations, a checkpoint
    # at each epoch's end (a run this short), curves with step = iteration.
    assert (params["pretrain_iterations"], params["pretrain_epochs"]) == (4, 2.0)
    for duplicate in ("pretrain.num_classes", "pretrain.images_per_class", "pretrain.label_set", "name"):
        assert duplicate not in params  # each fact once, under the study's name
    assert [step for kind, _, step in reports if kind == "checkpoint"] == [2, 4]
    # Curves: pretraining's every iteration (curve_every 1) with validation at each checkpoint; the
    # region-based stages' every 20 iterations and at the last (12 and 10 here), the scene stage's
    # after each of its epochs (1 here).
    curves = [(step, sorted(payload)) for kind, payload, step in reports if kind == "curve"]
    assert [(step, keys) for step, keys in curves if keys[0].startswith("pretrain/")] == [
        (1, ["pretrain/loss", "pretrain/lr"]), (2, ["pretrain/loss", "pretrain/lr"]), (2, ["pretrain/val_top1"]),
        (3, ["pretrain/loss", "pretrain/lr"]), (4, ["pretrain/loss", "pretrain/lr"]), (4, ["pretrain/val_top1"])]
    assert [payload["pretrain/lr"] for kind, payload, _ in reports
            if kind == "curve" and "pretrain/lr" in payload] == [0.02] * 4
    assert [(step, keys) for step, keys in curves if not keys[0].startswith("pretrain/")] == [
        (12, ["detection/loss", "detection/loss_box", "detection/loss_classification", "detection/lr"]),
        (10, ["action/loss", "action/lr"]), (1, ["scene/loss", "scene/lr"])]
    assert all(value > 0 for kind, payload, _ in reports if kind == "curve" for value in payload.values())
    # The trial's record: its config, labels and subset, as the files say.
    work = tmp_path / "work"
    assert load_spec(work / "config.yaml").trial == config
    assert (work / "label_set.tsv").read_text().splitlines()[0] == "wnid\tgroup_wnid"
    assert len((work / "label_set.tsv").read_text().splitlines()) == 1 + 4
    rows = [line.split("\t") for line in (work / "subset.tsv").read_text().splitlines()]
    assert rows[0] == ["image_key", "wnid", "manifest_row"] and len(rows) == 1 + 32
    keys = "\n".join(row[0] for row in rows[1:])
    assert hashlib.sha256(keys.encode()).hexdigest()[:16] == params["subset_hash"]
    subset = json.loads((work / "subset.json").read_text())
    assert subset["subset_hash"] == params["subset_hash"] and subset["images"] == 32 and len(subset["classes"]) == 4
    assert not (work / "pretrain.pt").exists()  # the pretraining checkpoint goes once the weights are saved
    stages = json.loads((tmp_path / "work" / "stages.json").read_text())
    assert set(stages) == {"pretrain", "detection", "action", "scene"}
    saved = torch.load(tmp_path / "work" / "backbone.pt", weights_only=True)
    assert "features.conv1.weight" in saved and "embed.fc6.weight" in saved
    assert (tmp_path / "work" / "per_image" / "sun397_predictions.parquet").is_file()

    # A rerun finds every stage done: same metrics, no training.
    lines.clear()
    again = run_trial(config, tmp_path / "work", lambda *a: None, log=lines.append)
    assert {m: again[m] for m in FINAL_METRICS} == {m: final[m] for m in FINAL_METRICS}
    assert any("pretrain: done earlier" in line for line in lines)
    assert not any("epoch" in line or "iteration" in line for line in lines)


def test_interrupted_pretraining_resumes_from_its_checkpoint(tmp_path, mini_paths):
    config = load_spec(tiny_spec(tmp_path / "tiny.yaml", mini_paths)).trials()[0]
    work, snapshot = tmp_path / "work", tmp_path / "checkpoint"

    def report(kind, payload, step):  # the folder as a sweep checkpoints it at pretraining's last checkpoint
        if kind == "checkpoint" and step == 4:
            shutil.copytree(work, snapshot)

    first = run_trial(config, work, report, log=lambda line: None)
    # Start again from that checkpoint, as a retry does after a kill during the transfer stages.
    assert (snapshot / "pretrain.pt").is_file() and not (snapshot / "backbone.pt").exists()
    lines = []
    final = run_trial(config, snapshot, lambda *a: None, log=lines.append)
    assert any("resumed after iteration 4 (epoch 2.00)" in line for line in lines)
    assert {m: final[m] for m in FINAL_METRICS} == {m: first[m] for m in FINAL_METRICS}


def test_random_init_control_skips_pretraining(tmp_path, mini_paths):
    control = load_spec(tiny_spec(tmp_path / "tiny.yaml", mini_paths)).trials()[1]
    assert control.pretrain.images_per_class == 0
    reports = []
    run_trial(control, tmp_path / "work", lambda kind, payload, step: reports.append(kind), log=lambda line: None)
    # Each transfer stage reports its curves (one or more points) before its result.
    collapsed = [kind for index, kind in enumerate(reports) if kind != "curve" or reports[index - 1] != "curve"]
    assert collapsed == ["params", "stage", "curve", "stage", "curve", "stage", "curve", "stage", "final"]
    assert not (tmp_path / "work" / "pretrain.pt").exists()


def test_stages_import_neither_ray_nor_mlflow():
    import subprocess
    import sys

    code = ("import sys, itl_ray.trial, itl_ray.config, itl_ray.cli, itl_ray.datasets.synthetic;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_coarse_label_set_trains_on_groups(tmp_path, mini_paths):
    from itl_ray import label_sets
    from itl_ray.config import override

    base = load_spec(tiny_spec(tmp_path / "tiny.yaml", mini_paths)).trials()[0]
    config = override(base, {"pretrain.label_set": "up_down_9", "pretrain.num_classes": None,
                             "pretrain.images_per_class": 2, "pretrain.epochs": 1,
                             "transfer.detection.iterations": 0, "transfer.action.iterations": 1, "transfer.scene.epochs": 1,
                             "transfer.induction.enabled": True, "transfer.induction.train_per_class": 4})
    reports, lines = [], []
    final = run_trial(config, tmp_path / "work", lambda kind, payload, step: reports.append((kind, payload)),
                      log=lines.append)
    # Induction: the 40 fine classes told apart by nearest neighbours on the 9-group network's fc7.
    assert 0 <= final["induction_top1"] <= final["induction_top5"] <= 100
    assert [payload for kind, payload in reports if kind == "stage"][-1].keys() >= {"induction_top1", "induction_top5"}
    assert any(line.startswith("induction: up_down_9 network, 40 fine classes, 160 memory") for line in lines)
    assert lines[-1].startswith("trial: pretrain_top1") and "induction_top1" in lines[-1]
    params = reports[0][1]
    groups = set(label_sets.label_set("up_down_9", list(wordnet_classes(mini_paths))).values())
    assert params["label_set"] == "up_down_9" and params["num_classes"] == len(groups) == 9
    assert params["source_classes"] == 40
    assert len(json.loads((tmp_path / "work" / "subset.json").read_text())["classes"]) == 40
    fine = label_sets.label_set("fine", list(wordnet_classes(mini_paths)))
    from itl_ray.trial import label_set_hash

    assert params["label_set_hash"] != label_set_hash(fine)


def wordnet_classes(mini_paths):
    from itl_ray.shards import Prepared

    return sorted(set(Prepared(mini_paths["imagenet"], "imagenet").column("label")))


def test_a_voc2007_folder_without_proposals_is_refused_before_training(tmp_path, mini_paths):
    """read_inputs (what a sweep runs for every trial before Ray starts) checks the stored Selective
    Search proposals when detection uses them, and only then."""
    from itl_ray.errors import UserError

    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths)
    selective = {"transfer.detection.proposals": "selective_search"}
    read_inputs(load_spec(spec, selective).trials()[0])  # the prepared folder has them
    folder = tmp_path / "voc2007"
    shutil.copytree(mini_paths["voc2007"], folder)
    shutil.rmtree(folder / "proposals")  # as a folder copied without them, or damaged, looks
    selective["data.voc2007"] = str(folder)
    with pytest.raises(UserError) as refused:
        read_inputs(load_spec(spec, selective).trials()[0])
    message = str(refused.value)
    assert "data.voc2007" in message and "proposals-00000.arrow is missing" in message
    assert "run `itl-ray prepare voc2007 ROOT OUT` again" in message and "\n" not in message
    # Sliding windows need no stored proposals.
    read_inputs(load_spec(spec, {"data.voc2007": str(folder)}).trials()[0])


def test_a_poisoned_checkpoint_stops_the_trial_with_one_line(tmp_path, mini_paths):
    """A pretraining checkpoint that carries a pickled object (code that would run when it is
    unpickled) is refused: `itl-ray trial` exits non-zero with one line, and the code never runs."""
    import os

    from tests.test_cli import assert_one_line_error, itl_ray

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    work = tmp_path / "work"
    work.mkdir()
    torch.save({"model": {}, "iteration": 1, "hook": Payload()}, work / "pretrain.pt")
    spec = tiny_spec(tmp_path / "tiny.yaml", mini_paths)
    done = itl_ray("trial", str(spec), "--index", "0", "--no-track", "--workdir", str(work), cwd=tmp_path)
    assert_one_line_error(done, f"pretraining checkpoint {work / 'pretrain.pt'} holds more than tensors and plain values",
                          "posix.system", "delete it")
    assert not marker.exists()
