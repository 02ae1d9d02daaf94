"""``itl-ray bench`` and scripts/gpu_bench.sh, on the CPU: both pipelines timed in one run, the last
line JSON, nothing of Ray, MLflow, nltk or YAML imported; the GPU script's steps in smoke mode."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from itl_ray.bench import SIZES, photo
from itl_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--images", "160", "--classes", "8", "--batch-size", "16", "--resolution", "48",
        "--width", "0.125", "--seconds", "1", "--warmup", "2"]


def test_bench_times_both_pipelines_and_ends_with_json_on_a_bare_stack(tmp_path):
    code = ("import sys, atexit\n"
            "atexit.register(lambda: print('IMPORTED', sorted({m.split('.')[0] for m in sys.modules} & "
            "{'ray', 'mlflow', 'nltk', 'yaml'}), file=sys.stderr))\n"
            "from itl_ray.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-c", code, "bench", *TINY, "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["project_img_s"] > 0 and result["baseline_img_s"] > 0
    assert result["ratio"] == pytest.approx(result["project_img_s"] / result["baseline_img_s"], rel=0.01)
    assert result["device"] == "cpu" and result["batch_size"] == 16 and result["resolution"] == 48
    assert result["images"] == 160 and result["short_side"] == 54 and len(result["variants"]) == 1  # 48 * 256 / 227
    text = "\n".join(lines)
    assert "baseline (torchvision ImageFolder" in text and "project (fast pipeline" in text and "ratio:" in text
    assert "IMPORTED []" in done.stderr
    # The images and shards stay in --work and are used again.
    assert (tmp_path / "work" / "images" / "DONE").is_file() and (tmp_path / "work" / "shards-54").is_dir()


def test_gpu_script_runs_its_steps_and_writes_the_table(tmp_path):
    environment = {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
                   "PYTHON": sys.executable}
    # The reference scripts need a GPU and are skipped here; the table takes what their logs hold.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "gpu_anchor.log").write_text(
        'warming up\n{"name": "alexnet_train", "value": 37815.0, "unit": "img/s", "bs": 512}\n')
    (tmp_path / "out" / "gpu_naive_pipeline.log").write_text(
        'wrote 6000 jpegs\n{"loader_only_img_s": 2088.0, "end_to_end_img_s": 2049.0, "workers": 15}\n')
    done = subprocess.run(["bash", "scripts/gpu_bench.sh", "--cpu-smoke"], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| the study's AlexNet: torchvision ImageFolder baseline, end to end |" in table
    assert "| the study's AlexNet: project pipeline, end to end |" in table
    assert "| torchvision AlexNet: ratio, best project / baseline |" in table
    assert "| anchor: alexnet_train | 37,815 | bs=512 |" in table
    assert "| anchor: naive pipeline + AlexNet, end to end | 2,049 |" in table
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["bench_itl"]["device"] == "cpu" and summary["bench_torchvision"]["model"] == "torchvision"
    dry = subprocess.run(["bash", "scripts/gpu_bench.sh", "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                         env=environment, timeout=60)
    assert "bench --device cuda" in dry.stdout
    if (ROOT.parent / "shared" / "bench").is_dir() or (ROOT / "shared" / "bench").is_dir():
        assert "gpu_anchor.py" in dry.stdout and "gpu_naive_pipeline.py" in dry.stdout
    else:  # a clone without ../shared: the script says it skips the reference scripts
        assert "reference scripts not run" in dry.stdout


@pytest.mark.parametrize("arguments, named", [
    (["--cpu-share", "0.5,2"], "--cpu-share"),
    (["--cpu-share", "half"], "--cpu-share"),
    (["--batch-size", "0"], "--batch-size"),
    (["--images", "10", "--classes", "20"], "--images"),
])
def test_bad_settings_stop_with_one_line(arguments, named, capsys):
    assert main(["bench", "--device", "cpu", *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and named in error and "\n" not in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_user_error(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no GPU" in capsys.readouterr().err


def test_generated_photos_are_deterministic_imagenet_sized_jpegs():
    first = photo(0, 7)
    assert first == photo(0, 7) and first != photo(1, 7)
    image = Image.open(io.BytesIO(first))
    assert image.format == "JPEG" and image.size in SIZES
    sizes = [len(photo(0, index)) for index in range(8)]
    assert 50_000 < sum(sizes) / len(sizes) < 200_000
