"""Stage seeds, and a trial resumed from any stage boundary ending with exactly the numbers of a
trial that ran through."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys

import torch

from itl_ray.config import load_spec
from itl_ray.seeds import seeded, stage_seed
from itl_ray.trial import run_trial
from tests.conftest import tiny_spec


def test_stage_seed_is_a_stable_hash_of_seed_and_stage():
    assert stage_seed(0, "pretrain") == stage_seed(0, "pretrain")
    seeds = {stage_seed(seed, stage) for seed in (0, 1, 2) for stage in ("init", "pretrain", "detection", "action",
                                                                           "scene")}
    assert len(seeds) == 15 and all(0 <= seed < 2**63 for seed in seeds)
    # The same in another process with another string-hash salt (no use of hash()).
    code = "from itl_ray.seeds import stage_seed; print(stage_seed(0, 'pretrain'), stage_seed(7, 'scene'))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.split() == [str(stage_seed(0, "pretrain")), str(stage_seed(7, "scene"))]


def test_seeded_draws_the_same_and_leaves_the_global_generator_as_found():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with seeded(11):
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(100)  # whatever happened before does not matter
    with seeded(11):
        assert torch.equal(torch.rand(4), first)


def _strip_timers(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if not key.startswith("seconds/")}


def test_a_trial_resumed_at_any_boundary_ends_with_the_same_numbers(tmp_path, mini_paths):
    """Run a trial through, keeping a copy of its working folder at each boundary a sweep
    checkpoints (after pretraining epoch 1, after pretraining, after detection, after action);
    resume each copy in a process whose global generator is elsewhere; every final metric equals
    the uninterrupted run's, exactly."""
    config = load_spec(tiny_spec(tmp_path / "tiny.yaml", mini_paths)).trials()[0]
    assert config.pretrain.images_per_class > 0 and config.pretrain.epochs == 2
    work = tmp_path / "through"
    copies = {}

    def report(kind, payload, step):
        if kind == "checkpoint" and "pretrain epoch 1" not in copies:  # the first: epoch 1's end
            shutil.copytree(work, tmp_path / "after-epoch-1")
            copies["pretrain epoch 1"] = tmp_path / "after-epoch-1"
        elif kind == "stage" and "pretrain_top1" not in payload:  # a transfer stage's result
            stage = "detection" if "voc07_det_map" in payload else "action" if "voc12_act_map" in payload else "scene"
            shutil.copytree(work, tmp_path / f"after-{stage}")
            copies[stage] = tmp_path / f"after-{stage}"

    torch.manual_seed(1)
    global_before = torch.get_rng_state()
    through = _strip_timers(run_trial(config, work, report, log=lambda line: None))
    assert torch.equal(torch.get_rng_state(), global_before)  # the trial leaves the global generator alone

    # After pretraining: the folder after detection without detection's result.
    after_pretraining = tmp_path / "after-pretraining"
    shutil.copytree(copies["detection"], after_pretraining)
    stages = json.loads((after_pretraining / "stages.json").read_text())
    del stages["detection"]
    (after_pretraining / "stages.json").write_text(json.dumps(stages))
    boundaries = {"pretrain epoch 1": copies["pretrain epoch 1"], "pretraining": after_pretraining,
                  "detection": copies["detection"], "action": copies["action"]}

    for draws, (boundary, folder) in enumerate(boundaries.items(), start=1):
        torch.manual_seed(1000 + draws)  # a resumed process's global generator is anywhere
        torch.rand(17 * draws)
        lines = []
        resumed = _strip_timers(run_trial(config, folder, lambda *a: None, log=lines.append))
        assert resumed == through, (boundary, {k: (through[k], resumed.get(k)) for k in through
                                               if through[k] != resumed.get(k)})
        if boundary == "pretrain epoch 1":
            assert any(re.search(r"resumed after iteration \d+ \(epoch 1\.00\)", line) for line in lines)
        else:
            assert any("pretrain: done earlier" in line for line in lines)
