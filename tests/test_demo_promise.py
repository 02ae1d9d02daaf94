"""The README's headline promise, on the demo's own data: a pretrained trial of the smoke sweep beats
the random-initialisation control on all three transfer metrics.

The mini-benchmark is generated at the demo's size (the generator's default ``Sizes``) and prepared
as `make demo` prepares it; the trials are those of ``sweeps/smoke.yaml`` with its settings, run in
this process without Ray and with one torch thread, as the demo's sweep runs each trial
(``cpus_per_trial: 1``); the two trials run side by side in two processes, as the demo runs two at
a time. The pretrained trial is the smoke sweep's smallest (10 classes x 40 images): the least
pretraining of the sweep and the cheapest trial (its pretraining takes a tenth of the 40 x 120
one's).

Cost, measured on the 2-core development machine while other jobs shared it: 256 s in all at load
about 3 (generating and preparing the mini-benchmark 60 s, the two trials side by side 191 s; one
after the other they took 139 s and 110 s); 437 s within the full suite at load 4-7.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


from itl_ray.config import load_spec, override
from itl_ray.trial import run_trial

SMOKE = Path(__file__).resolve().parents[1] / "sweeps" / "smoke.yaml"
TRANSFER_METRICS = ("voc07_det_map", "voc12_act_map", "sun397_acc")


def smoke_trial(data: dict[str, str], num_classes: int, images_per_class: int):
    spec = load_spec(SMOKE, {f"data.{setting}": path for setting, path in data.items()})
    (config,) = [trial for trial in spec.trials()
                 if (trial.pretrain.num_classes, trial.pretrain.images_per_class) == (num_classes, images_per_class)]
    return override(config, {"runtime.threads": 1})


def final_metrics(config, workdir: Path) -> dict:
    """One trial, start to end, without Ray and without tracking; its final metrics in percent."""
    return run_trial(config, workdir, lambda *report: None, log=lambda line: None)


def test_pretrained_beats_the_random_init_control_on_every_transfer_metric(demo_data, tmp_path):
    configs = [smoke_trial(demo_data, 10, 40), smoke_trial(demo_data, 40, 0)]
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        pretrained, control = pool.map(final_metrics, configs, [tmp_path / "pretrained", tmp_path / "control"])
    assert control["pretrain_top1"] < 10 and pretrained["pretrain_top1"] > 20  # 40-way chance: 2.5
    figures = {metric: (round(pretrained[metric], 1), round(control[metric], 1)) for metric in TRANSFER_METRICS}
    for metric in TRANSFER_METRICS:
        assert pretrained[metric] > control[metric], f"pretrained vs control, in percent: {figures}"
