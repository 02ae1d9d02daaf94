"""The MLflow UI as a user opens it: a real `mlflow server` on a store written by the project's
Tracker, rendered by a headless Chromium (Debian's `chromium`) at the address a sweep prints."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from itl_ray import tracking
from itl_ray.tracking import Tracker
from tests.mlflow_server import mlflow_server

pytestmark = [
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.skipif(shutil.which("chromium") is None,
                       reason="Debian's chromium is not installed (apt-get install -y chromium)"),
]

TRIALS = {  # name -> (params, final metrics)
    "num_classes=40,images_per_class=120": ({"num_classes": 40, "images_per_class": 120, "pretrain_images": 4800},
                                            {"pretrain_top1": 75.4123, "voc07_det_map": 6.81, "voc12_act_map": 29.6,
                                             "sun397_acc": 35.8}),
    "num_classes=40,images_per_class=0": ({"num_classes": 40, "images_per_class": 0, "pretrain_images": 0},
                                          {"pretrain_top1": 2.5, "voc07_det_map": 0.8, "voc12_act_map": 17.3,
                                           "sun397_acc": 7.3}),
}


def demo_like_store(folder: Path) -> str:
    """A store as the demo's sweep leaves it (two trials of experiment "smoke"), written through
    the Tracker the sweep uses."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracker = Tracker("smoke", uri)
    parent = tracker.sweep_run("sweep-id", "smoke", resume=False)
    tracker.describe(parent, "The study in miniature.")
    for name, (params, final) in TRIALS.items():
        run = tracker.trial_run(name, name, parent)
        tracker.record(run, "params", {**params, "label_set": "fine", "seed": 0, "label_set_hash": "0123abcd"}, None)
        for epoch in (1, 2, 3):
            tracker.record(run, "curve", {"scene/loss": 3.0 / epoch, "scene/lr": 0.002}, epoch)
        tracker.record(run, "final", {**final, "seconds/trial": 61.2}, None)
        tracker.finish(run)
    tracker.finish(parent)
    return uri


def chromium(url: str, *output: str, profile: Path) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url``, run until the page's scripts have had 20 s of (virtual) time."""
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               "--window-size=1600,1000", "--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw",
               *output, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_the_printed_address_opens_the_trial_runs_with_their_metrics(tmp_path):
    uri = demo_like_store(tmp_path)
    hint = tracking.ui_hint("smoke", uri)
    address = hint.splitlines()[-1].split("then open ", 1)[1]
    assert address.startswith("http://127.0.0.1:5000/#/experiments/")
    with mlflow_server(uri, tmp_path / "server.log") as base:
        url = address.replace("http://127.0.0.1:5000", base)
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            dom = chromium(url, "--dump-dom", profile=Path(profile))
        assert dom.returncode == 0, dom.stderr[-2000:]
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom.stdout))
        with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
            shot = chromium(url, f"--screenshot={tmp_path / 'runs.png'}", profile=Path(profile))
        assert shot.returncode == 0, shot.stderr[-2000:]
    # The runs table of the model-training mode: the two trial runs listed flat (the sweep's run is
    # not a row), the headline metrics as columns, rounded values, the trials' own durations.
    assert "Model training" in text and "Run Name" in text
    assert "2 matching runs" in text
    for name in TRIALS:
        assert name in text
    for column in ("pretrain_top1", "voc07_det_map", "voc12_act_map", "sun397_acc", "images_per_class"):
        assert column in text
    assert "75.41" in text and "75.4123" not in text
    assert "Traces 0" not in text and "No data available" not in text  # not the GenAI overview
    # The screenshot shows a rendered page, not a blank one.
    from PIL import Image

    image = Image.open(tmp_path / "runs.png").convert("RGB")
    assert image.size == (1600, 1000)
    assert len(set(image.resize((400, 250)).getdata())) > 50
