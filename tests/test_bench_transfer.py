"""scripts/gpu_transfer.sh and benchmarks/bench_transfer.py's detection part, on the CPU: the GPU
script's commands, and its steps in smoke mode end to end (a generated VOC-2007-like set, prepared,
one short detection stage in a fresh process, results.json and table.md with the extrapolation
marked as one)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def environment(tmp_path: Path) -> dict:
    import sys

    return {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable}


def test_dry_run_prints_the_gpu_commands(tmp_path):
    done = subprocess.run(["bash", "scripts/gpu_transfer.sh", "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                          env=environment(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2
    assert "--trainval 5011 --test 4952 --prepare-only" in lines[0]
    assert "--device cuda --iterations 2000" in lines[1] and "--window-stride 0.18" in lines[1]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    wrong = subprocess.run(["bash", "scripts/gpu_transfer.sh", "--fast"], capture_output=True, text=True, cwd=ROOT,
                           env=environment(tmp_path), timeout=60)
    assert wrong.returncode == 2 and "usage:" in wrong.stderr


def test_cpu_smoke_runs_every_step_and_writes_the_results(tmp_path):
    done = subprocess.run(["bash", "scripts/gpu_transfer.sh", "--cpu-smoke"], capture_output=True, text=True,
                          cwd=ROOT, env=environment(tmp_path), timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["status"]["data"].startswith("exit 0") and results["status"]["detection"].startswith("exit 0")
    detection = results["detection"]
    assert detection["device"] == "cpu" and detection["trainval_images"] == 24 and detection["test_images"] == 3
    assert detection["iterations"] == 40 and detection["train_it_s"] > 0 and detection["test_images_s"] > 0
    assert 0 < detection["rss_before_stage_gib"] <= detection["peak_rss_gib"]
    assert "stand-in for timing" in detection["proposals"]
    assert "extrapolated from 40 iterations and 3 test images" in detection["extrapolated_full_recipe"]["note"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| full recipe, EXTRAPOLATED" in table and "| training, measured |" in table
