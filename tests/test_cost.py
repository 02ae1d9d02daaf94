"""The dry run's cost model: FLOPs of AlexNet, iterations, the throughput figure and its source."""

from __future__ import annotations

import json

import pytest

from itl_ray.config import TrialConfig, load_spec, override
from itl_ray.cost import DEFAULT_IMG_PER_S, image_flops, iterations, throughput, trial_cost
from itl_ray.errors import UserError


def test_alexnet_flops():
    # The study's AlexNet at 227 px: about 0.72 G multiply-adds (1.45 GFLOPs) per image.
    assert image_flops(1.0, 227) == pytest.approx(1.45e9, rel=0.02)
    # The demo's network (quarter width, 64 px) costs a small fraction of it.
    assert 1 / 200 < image_flops(0.25, 64) / image_flops(1.0, 227) < 1 / 50


def test_iterations_follow_epochs_images_and_batch():
    assert iterations(1000, 3, 256) == 3 * 4  # the last, smaller batch of an epoch is a step
    assert iterations(1024, 2, 256) == 8
    assert iterations(0, 90, 256) == 0


def test_throughput_comes_from_the_option_then_a_cuda_bench_then_the_assumption(tmp_path):
    result = tmp_path / "latest.json"
    assumed = throughput(None, result)
    assert assumed.img_per_s == DEFAULT_IMG_PER_S and "ASSUMED" in assumed.source
    result.write_text(json.dumps({"device": "cpu", "project_img_s": 900.0, "width": 0.25, "resolution": 64}))
    cpu = throughput(None, result)
    assert cpu.img_per_s == DEFAULT_IMG_PER_S and "CPU measurement, not used" in cpu.source
    result.write_text(json.dumps({"device": "cuda", "project_img_s": 30000.0, "width": 1.0, "resolution": 224,
                                  "date": "2026-11-30", "device_name": "H200"}))
    measured = throughput(None, result)
    assert (measured.img_per_s, measured.resolution) == (30000.0, 224) and "H200" in measured.source
    assert throughput(5000.0, result).img_per_s == 5000.0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match="--img-per-s must be a positive, finite number"):
            throughput(bad, result)


def test_a_trial_costs_what_its_schedule_says():
    speed = throughput(25_000.0)
    base = TrialConfig(data=TrialConfig().data.__class__(imagenet="/nowhere"))
    full = trial_cost(base, speed)
    assert full.nominal and full.pretrain_images == 1_281_167
    assert full.iterations == 450_000  # Caffe's solver
    # 450,000 iterations of 256 images at 25,000 img/s: 1.28 hours of training (plus 90 validation
    # passes over 50,000 images, one per checkpoint).
    assert 1.28 < full.pretrain_gpu_hours < 1.4
    assert 0 < full.transfer_gpu_hours < full.pretrain_gpu_hours
    # 50 images per class: the subset rule decides the cost.
    small = {rule: trial_cost(override(base, {"pretrain.images_per_class": 50, "pretrain.subset_schedule": rule}), speed)
             for rule in ("same_iterations", "same_epochs", "scaled")}
    assert [small[rule].iterations for rule in small] == [450_000, 17_622, 88_899]
    assert small["same_iterations"].pretrain_gpu_hours > small["scaled"].pretrain_gpu_hours \
        > small["same_epochs"].pretrain_gpu_hours
    # Ten SUN397 partitions fine-tune ten times; induction adds its forward passes.
    more = trial_cost(override(base, {"transfer.scene.partitions": list(range(1, 11)),
                                      "transfer.induction.enabled": True}), speed)
    assert more.transfer_gpu_hours > full.transfer_gpu_hours


def test_dry_run_lists_every_experiment_and_a_total(tmp_path):
    from pathlib import Path

    from itl_ray.sweep import dry_run

    spec = load_spec(Path(__file__).resolve().parents[1] / "sweeps" / "paper.yaml")
    text = dry_run(spec, img_per_s=25_000.0)
    for name in ("images_per_class", "number_of_classes", "fixed_budget", "split", "pascal_removed", "induction"):
        assert f"experiment {name}: " in text
    assert "total: 66 trials, ~" in text and "GPU-hours" in text
    assert "nominal counts" in text and "nothing was started" in text


def test_the_dry_run_command_takes_a_throughput_and_starts_nothing(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "itl_ray.cli", "sweep", str(repo / "sweeps" / "paper.yaml"), "--dry-run",
                           "--img-per-s", "50000"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(repo)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--img-per-s 50,000" in done.stdout and "total: 66 trials, ~" in done.stdout
    assert not (tmp_path / "itl_runs").exists()  # no store, no Ray storage
