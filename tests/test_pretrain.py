"""Pretraining: Caffe's schedule counted in iterations (the rate at chosen iterations, the rules for
subsets), resuming at any checkpoint (mid-epoch or at an epoch's end) ends with the weights of an
uninterrupted run, checkpoints load only tensors and plain values, curves, the fast pipeline
trains to the accuracy of the torchvision pipeline with the same seed; settings are validated."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from itl_ray.datasets.synthetic import Sizes, dataset_paths, synthesize
from itl_ray.errors import UserError
from itl_ray.image_rows import ImageRows
from itl_ray.images import short_side_for
from itl_ray.models import AlexNet
from itl_ray.prepare import PrepareSettings, prepare
from itl_ray.pretrain import (ILSVRC2012_TRAIN_IMAGES, PretrainConfig, PretrainRuntime, TrainStep, load_state,
                              plan_schedule, pretrain, top1)
from itl_ray.shards import Prepared

CPU = torch.device("cpu")
# A short schedule for the demo's network (a quarter-width AlexNet at 64 px, He initialisation as in
# sweeps/smoke.yaml): 18 epochs of the subset, the rate x0.1 after 14.
DEMO = PretrainConfig(schedule="epochs", subset_schedule="same_epochs", epochs=18, batch_size=64, lr=0.02,
                      lr_drop_every=14)


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Prepared:
    """A mini ImageNet with 40 training and 10 validation images per class (the demo's generator),
    prepared at the shorter side 64 px crops are cut from (72 px)."""
    base = tmp_path_factory.mktemp("pretrain")
    sizes = Sizes(train_per_class=40, val_per_class=10, voc07_trainval=4, voc07_test=4, voc12_train=4, voc12_val=4,
                  sun_per_scene=2)
    raw = synthesize(base / "mini", seed=0, sizes=sizes)
    prepare("imagenet", dataset_paths(raw)["imagenet"], base / "imagenet", PrepareSettings(short_side=short_side_for(64)))
    return Prepared(base / "imagenet", "imagenet")


def split(data: Prepared, classes: int) -> tuple[ImageRows, ImageRows]:
    labels = data.column("label")
    index = {wnid: i for i, wnid in enumerate(sorted(set(labels))[:classes])}

    def rows(split_name):
        chosen = np.array([row for row in data.rows_in(split_name) if labels[row] in index])
        return ImageRows(data, chosen, [index[labels[row]] for row in chosen])

    return rows("train"), rows("val")


def weights(model: torch.nn.Module) -> dict:
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_caffes_schedule_in_iterations():
    """solver.prototxt: base_lr 0.01, x0.1 (gamma) every 100,000 iterations (stepsize, "step"
    policy: the rate of 0-based iteration i is base_lr * 0.1 ** floor(i / stepsize)), 450,000 in all."""
    config = PretrainConfig()
    assert (config.schedule, config.iterations, config.lr_step_iterations, config.batch_size, config.lr,
            config.momentum, config.weight_decay) == ("iterations", 450_000, 100_000, 256, 0.01, 0.9, 5e-4)
    schedule = plan_schedule(config, ILSVRC2012_TRAIN_IMAGES, ILSVRC2012_TRAIN_IMAGES)
    assert (schedule.iterations, schedule.lr_step, schedule.batches_per_epoch) == (450_000, 100_000, 5005)
    rates = {i: schedule.lr_at(i, config.lr) for i in (0, 99_999, 100_000, 199_999, 200_000, 399_999, 400_000, 449_999)}
    assert rates == pytest.approx({0: 0.01, 99_999: 0.01, 100_000: 1e-3, 199_999: 1e-3, 200_000: 1e-4,
                                   399_999: 1e-5, 400_000: 1e-6, 449_999: 1e-6}, rel=1e-12)
    assert round(schedule.epochs, 1) == 89.9


@pytest.mark.parametrize("rule, iterations, lr_step", [
    ("same_iterations", 450_000, 100_000),  # 2,296 passes over 50 images of each of 1000 classes
    ("same_epochs", 17_622, 3_916),  # 89.9 passes: 450,000 x 196 / 5005 batches per epoch
    ("scaled", 88_899, 19_755),  # 450,000 x (50,000 / 1,281,167) ** 0.5
])
def test_the_subset_rule_decides_a_subsets_schedule(rule, iterations, lr_step):
    config = PretrainConfig(subset_schedule=rule)
    schedule = plan_schedule(config, 50 * 1000, ILSVRC2012_TRAIN_IMAGES)
    assert (schedule.iterations, schedule.lr_step, schedule.batches_per_epoch) == (iterations, lr_step, 196)
    full = plan_schedule(config, ILSVRC2012_TRAIN_IMAGES, ILSVRC2012_TRAIN_IMAGES)
    assert (full.iterations, full.lr_step) == (450_000, 100_000)  # every rule leaves the full set alone


def test_an_epoch_schedule_with_same_epochs_trains_every_subset_for_those_epochs():
    config = PretrainConfig(schedule="epochs", epochs=90, lr_drop_every=30, subset_schedule="same_epochs")
    schedule = plan_schedule(config, 50_000, ILSVRC2012_TRAIN_IMAGES)
    assert (schedule.iterations, schedule.lr_step, schedule.epochs) == (90 * 196, 30 * 196, 90.0)
    same_iterations = plan_schedule(replace(config, subset_schedule="same_iterations"), 50_000,
                                    ILSVRC2012_TRAIN_IMAGES)
    assert (same_iterations.iterations, same_iterations.lr_step) == (90 * 5005, 30 * 5005)


def run(model_seed, train, val, config, checkpoint, **hooks):
    torch.manual_seed(model_seed)
    model = AlexNet(10, width=0.125, resolution=48, init="kaiming")
    curves = []
    result = pretrain(model, train, val, config, CPU, 0, checkpoint, curve=lambda m, step: curves.append((step, m)),
                      log=hooks.pop("log", lambda line: None), **hooks)
    return model, result, curves


class Killed(Exception):
    pass


@pytest.mark.parametrize("checkpoint_every, killed_after", [
    (8, 16),  # checkpoints every 8 iterations: killed after iteration 16, in the middle of epoch 2
    (1000, 13),  # a run shorter than checkpoint_every checkpoints at epoch ends: killed after epoch 1
])
def test_resumed_pretraining_ends_with_the_weights_of_an_uninterrupted_run(imagenet, tmp_path, checkpoint_every,
                                                                            killed_after):
    train, val = split(imagenet, 10)  # 400 images: 13 batches of 32 per epoch
    # 30 iterations (2.3 epochs), the rate drops after 12 and 24; decoded every epoch by 2 threads;
    # dropout is on.
    config = PretrainConfig(iterations=30, lr_step_iterations=12, batch_size=32, lr=0.02,
                            checkpoint_every=checkpoint_every, curve_every=5)
    runtime = PretrainRuntime(cache_gib=0.0, workers=2)
    whole, straight, straight_curves = run(0, train, val, config, tmp_path / "whole.pt", runtime=runtime)

    def kill(iteration):
        if iteration == killed_after:
            raise Killed

    with pytest.raises(Killed):
        run(0, train, val, config, tmp_path / "resumed.pt", on_checkpoint=kill, runtime=runtime)
    torch.manual_seed(123)  # whatever happened to the global generator since, the checkpoint restores it
    lines = []
    resumed, result, curves = run(7, train, val, config, tmp_path / "resumed.pt", log=lines.append, runtime=runtime)
    assert any(f"resumed after iteration {killed_after}" in line for line in lines)
    assert result == straight
    expected = weights(whole)
    assert all(torch.equal(value, expected[name]) for name, value in weights(resumed).items())
    # The resumed run's curves continue the uninterrupted run's, value for value.
    assert curves == [(step, m) for step, m in straight_curves if step > killed_after]
    saved = load_state(tmp_path / "resumed.pt", "checkpoint")
    assert saved["iteration"] == 30 and saved["config"]["lr_step_iterations"] == 12 and "torch_rng" in saved


def test_curves_and_checkpoints_follow_the_iterations(imagenet, tmp_path):
    train, val = split(imagenet, 10)
    config = PretrainConfig(iterations=20, lr_step_iterations=6, batch_size=32, lr=0.02, checkpoint_every=8,
                            curve_every=1)
    checkpoints = []
    _, result, curves = run(0, train, val, config, tmp_path / "c.pt", on_checkpoint=checkpoints.append)
    assert checkpoints == [8, 16, 20]  # every 8 iterations and at the end (20 >= 8: not at epoch ends)
    rates = {step: m["pretrain/lr"] for step, m in curves if "pretrain/lr" in m}
    assert list(rates) == list(range(1, 21))  # step = iterations done
    # iteration 1..6 (0-based 0..5) at 0.02, then 0.002 for the next six, and so on.
    assert rates == pytest.approx({step: 0.02 * 0.1 ** ((step - 1) // 6) for step in range(1, 21)}, rel=1e-12)
    assert all(m["pretrain/loss"] > 0 for step, m in curves if "pretrain/loss" in m)
    val_steps = [step for step, m in curves if "pretrain/val_top1" in m]
    assert val_steps == [8, 16, 20] and curves[-1][1]["pretrain/val_top1"] == result["pretrain_top1"]
    # The optimizer gives biases twice the rate, and no decay, at every step (the last: 0.02 * 0.001).
    groups = load_state(tmp_path / "c.pt", "checkpoint")["optimizer"]["param_groups"]
    assert [(g["kind"], g["lr"], g["weight_decay"]) for g in groups] == [("weight", pytest.approx(2e-5), 5e-4),
                                                                          ("bias", pytest.approx(4e-5), 0.0)]


def test_a_checkpoint_carrying_a_pickled_object_is_refused(imagenet, tmp_path):
    """A checkpoint is read with weights_only=True: one that would run code when unpickled is refused
    with one line, and the code does not run."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "pretrain.pt"
    torch.save({"model": {}, "iteration": 3, "hook": Payload()}, evil)
    train, val = split(imagenet, 10)
    with pytest.raises(UserError) as caught:
        run(0, train, val, PretrainConfig(iterations=2, batch_size=32), evil)
    message = str(caught.value)
    assert "\n" not in message and str(evil) in message and "holds more than tensors and plain values" in message
    assert "posix.system" in message and "delete it" in message
    assert not marker.exists()
    evil.write_bytes(evil.read_bytes()[:40])  # a truncated file: one line too
    with pytest.raises(UserError, match="cannot be read .*delete it"):
        run(0, train, val, PretrainConfig(iterations=2, batch_size=32), evil)


def test_a_checkpoint_of_another_schedule_is_refused(imagenet, tmp_path):
    train, val = split(imagenet, 10)
    config = PretrainConfig(iterations=4, batch_size=32)
    run(0, train, val, config, tmp_path / "p.pt")
    with pytest.raises(UserError, match="written for another schedule"):
        run(0, train, val, replace(config, iterations=6), tmp_path / "p.pt")


def test_fast_pipeline_trains_to_the_accuracy_of_the_torchvision_pipeline(imagenet, tmp_path):
    """The demo's model and schedule, 20 classes, the same seed. The two pipelines feed the network
    the same pixels here (tests/test_fast_loader.py checks that), so the runs agree; both must learn."""
    train, val = split(imagenet, 20)
    accuracy = {}
    for pipeline in ("fast", "torchvision"):
        torch.manual_seed(0)
        model = AlexNet(20, width=0.25, resolution=64, init="kaiming")  # the demo's (sweeps/smoke.yaml)
        config = replace(DEMO, pipeline=pipeline)
        result = pretrain(model, train, val, config, CPU, 0, tmp_path / f"{pipeline}.pt", log=lambda line: None,
                          runtime=PretrainRuntime(cache_gib=0.0, workers=2))
        accuracy[pipeline] = result["pretrain_top1"]
    chance = 100 / 20
    assert min(accuracy.values()) > 4 * chance, accuracy
    assert abs(accuracy["fast"] - accuracy["torchvision"]) <= 1.0, accuracy


def test_random_initialisation_is_near_chance(imagenet):
    _, val = split(imagenet, 20)
    torch.manual_seed(0)
    accuracy = top1(AlexNet(20, width=0.125, resolution=48), val, PretrainConfig(), CPU)
    assert 0.0 <= accuracy < 0.2


@pytest.mark.parametrize("section, key, value, message", [
    ("pretrain", "schedule", "steps", "schedule='steps' is not one of the choices: iterations, epochs"),
    ("pretrain", "subset_schedule", "equal",
     "subset_schedule='equal' is not one of the choices: same_iterations, same_epochs, scaled"),
    ("pretrain", "subset_power", 1.5, "subset_power=1.5 is out of range; allowed: >= 0 and <= 1"),
    ("pretrain", "iterations", 0, "iterations=0 is out of range; allowed: >= 1"),
    ("pretrain", "lr_step_iterations", 0, "lr_step_iterations=0 is out of range; allowed: >= 1"),
    ("pretrain", "checkpoint_every", 0, "checkpoint_every=0 is out of range; allowed: >= 1"),
    ("pretrain", "curve_every", 0, "curve_every=0 is out of range; allowed: >= 1"),
    ("pretrain", "pipeline", "dali", "pipeline='dali' is not one of the choices: fast, torchvision"),
    ("pretrain", "augment", "mixup", "augment='mixup' is not one of the choices: crop, random_resized_crop"),
    ("pretrain", "precision", "fp16", "precision='fp16' is not one of the choices: auto, bf16, fp32"),
    ("pretrain", "lr", -0.01, "lr=-0.01 is out of range; allowed: > 0"),
    ("pretrain", "momentum", 1.0, "momentum=1.0 is out of range; allowed: >= 0 and < 1"),
    ("pretrain", "weight_decay", -5e-4, "weight_decay=-0.0005 is out of range; allowed: >= 0"),
    ("pretrain", "num_classes", 0, "num_classes=0 is out of range; allowed: >= 1"),
    ("pretrain", "shortfall", "skip", "shortfall='skip' is not one of the choices: take_all, error"),
    ("runtime.pretrain", "compile", "yes", "compile='yes' is not one of the choices: auto, on, off"),
    ("runtime.pretrain", "channels_last", "true", "channels_last='true' is not one of the choices: auto, on, off"),
    ("runtime.pretrain", "cpu_decode_share", 1.5, "cpu_decode_share=1.5 is out of range; allowed: >= 0 and <= 1"),
    ("runtime.pretrain", "workers", -1, "workers=-1 is out of range; allowed: >= 0"),
    ("runtime.pretrain", "cache_gib", -2.0, "cache_gib=-2.0 is out of range; allowed: >= 0"),
    ("runtime.pretrain", "prefetch", 0, "prefetch=0 is out of range; allowed: >= 1"),
])
def test_settings_name_bad_values(section, key, value, message):
    """Bounds and choices are declared on the fields of PretrainConfig and PretrainRuntime; the
    config's validator names them."""
    from itl_ray.config import validate

    kind = PretrainConfig if section == "pretrain" else PretrainRuntime
    assert validate(kind(), section) == kind()
    with pytest.raises(UserError, match=re.escape(f"{section}.{message}")):
        validate(replace(kind(), **{key: value}), section)


def test_a_failing_compiler_falls_back_to_eager(monkeypatch):
    def broken(model, **options):
        def compiled(images):
            raise RuntimeError("no C++ compiler here")
        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(0)
    model = AlexNet(5, width=0.125, resolution=48)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    lines = []
    step = TrainStep(model, optimizer, CPU, compile=True, log=lines.append)
    loss = step(torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 3]))
    assert loss.shape == () and step.compiled is None
    assert lines and "torch.compile failed (RuntimeError: no C++ compiler here)" in lines[0]


def test_an_error_of_the_model_is_raised_not_taken_for_a_compiler_failure(monkeypatch):
    """A compiled model that fails where the eager one fails too: the model's own error reaches the
    caller, with no compiler log line, and compiling stays on."""

    class Broken(AlexNet):
        def forward(self, images):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x9216 and 1024x5)")

    monkeypatch.setattr(torch, "compile", lambda model, **options: model)  # "compiles" to the model itself
    torch.manual_seed(0)
    model = Broken(5, width=0.125, resolution=48)
    lines = []
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.01), CPU, compile=True, log=lines.append)
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        step(torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 3]))
    assert lines == [] and step.compiled is not None


def test_a_compiler_error_type_falls_back_and_is_named(monkeypatch):
    def broken(model, **options):
        def compiled(images):
            raise torch._dynamo.exc.InternalTorchDynamoError("graph break in a guard")
        return compiled

    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(0)
    eager_model = AlexNet(5, width=0.125, resolution=48)
    torch.manual_seed(0)
    model = AlexNet(5, width=0.125, resolution=48)
    lines = []
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.01), CPU, compile=True, log=lines.append)
    eager = TrainStep(eager_model, torch.optim.SGD(eager_model.parameters(), lr=0.01), CPU, log=lambda line: None)
    images, labels = torch.randn(4, 3, 48, 48), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    loss = step(images, labels)
    torch.manual_seed(1)  # dropout draws the same masks in the eager run
    assert torch.equal(loss, eager(images, labels)) and step.compiled is None
    assert lines == ["pretrain: torch.compile failed (InternalTorchDynamoError: graph break in a guard); "
                     "training eagerly"]
