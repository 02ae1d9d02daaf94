"""Pretraining: resuming mid-way ends with the weights of an uninterrupted run; the fast pipeline
trains to the accuracy of the torchvision pipeline with the same seed; settings are validated."""

from __future__ import annotations

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
from itl_ray.pretrain import PretrainConfig, TrainStep, pretrain, top1
from itl_ray.shards import Prepared

CPU = torch.device("cpu")
# The demo's schedule (sweeps/smoke.yaml): a quarter-width AlexNet at 64 px, 18 epochs.
DEMO = PretrainConfig(epochs=18, batch_size=64, lr=0.02, lr_drop_every=14)


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


def test_resumed_pretraining_ends_with_the_weights_of_an_uninterrupted_run(imagenet, tmp_path):
    train, val = split(imagenet, 10)
    # Decoded every epoch by 2 threads; the learning rate drops during the run; dropout is on.
    config = PretrainConfig(epochs=3, batch_size=32, lr=0.02, lr_drop_every=2, cache_gib=0.0, workers=2)

    def model():
        torch.manual_seed(0)
        return AlexNet(10, width=0.125, resolution=48)

    whole = model()
    straight = pretrain(whole, train, val, config, CPU, 0, tmp_path / "whole.pt", log=lambda line: None)

    class Killed(Exception):
        pass

    def kill_after_two(epoch, metrics):
        if epoch == 2:
            raise Killed

    first = model()
    with pytest.raises(Killed):
        pretrain(first, train, val, config, CPU, 0, tmp_path / "resumed.pt", on_epoch=kill_after_two,
                 log=lambda line: None)
    torch.manual_seed(123)  # whatever happened to the global generator since, the checkpoint restores it
    resumed, lines = model(), []
    result = pretrain(resumed, train, val, config, CPU, 0, tmp_path / "resumed.pt", log=lines.append)
    assert any("resumed after epoch 2" in line for line in lines)
    assert result == straight
    expected = weights(whole)
    assert all(torch.equal(value, expected[name]) for name, value in weights(resumed).items())
    saved = torch.load(tmp_path / "resumed.pt", weights_only=False)
    assert saved["epoch"] == 3 and saved["config"]["cache_gib"] == 0.0 and "torch_rng" in saved


def test_fast_pipeline_trains_to_the_accuracy_of_the_torchvision_pipeline(imagenet, tmp_path):
    """The demo's model and schedule, 20 classes, the same seed. The two pipelines feed the network
    the same pixels here (tests/test_fast_loader.py checks that), so the runs agree; both must learn."""
    train, val = split(imagenet, 20)
    accuracy = {}
    for pipeline in ("fast", "torchvision"):
        torch.manual_seed(0)
        model = AlexNet(20, width=0.25, resolution=64)
        config = replace(DEMO, pipeline=pipeline, cache_gib=0.0, workers=2)
        result = pretrain(model, train, val, config, CPU, 0, tmp_path / f"{pipeline}.pt", log=lambda line: None)
        accuracy[pipeline] = result["pretrain_top1"]
    chance = 100 / 20
    assert min(accuracy.values()) > 4 * chance, accuracy
    assert abs(accuracy["fast"] - accuracy["torchvision"]) <= 1.0, accuracy


def test_random_initialisation_is_near_chance(imagenet):
    _, val = split(imagenet, 20)
    torch.manual_seed(0)
    accuracy = top1(AlexNet(20, width=0.125, resolution=48), val, PretrainConfig(), CPU)
    assert 0.0 <= accuracy < 0.2


@pytest.mark.parametrize("key, value, message", [
    ("pipeline", "dali", "pipeline must be one of fast, torchvision, got 'dali'"),
    ("augment", "mixup", "augment must be one of crop, random_resized_crop, got 'mixup'"),
    ("precision", "fp16", "precision must be one of auto, bf16, fp32, got 'fp16'"),
    ("compile", "yes", "compile must be one of auto, on, off, got 'yes'"),
    ("channels_last", "true", "channels_last must be one of auto, on, off"),
    ("cpu_decode_share", 1.5, "cpu_decode_share must be between 0 and 1, got 1.5"),
    ("workers", -1, "workers must be >= 0"),
    ("cache_gib", -2.0, "cache_gib must be >= 0"),
    ("prefetch", 0, "prefetch must be >= 1"),
])
def test_settings_name_bad_values(key, value, message):
    with pytest.raises(UserError, match=f"pretrain.{message}"):
        replace(PretrainConfig(), **{key: value}).validate("pretrain")


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
