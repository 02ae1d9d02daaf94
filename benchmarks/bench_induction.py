"""Induction accuracy on the mini-benchmark: how long the stage takes, and its memory at full size.

    python benchmarks/bench_induction.py [--shards data/mini-shards] [--threads 1] [--repeats 3]

The stage as a trial of ``sweeps/smoke.yaml`` runs it: the demo's network (quarter-width AlexNet
at 64 px, untrained: the time does not depend on the weights) on the 40 classes of the prepared
mini ImageNet (``make demo`` writes it; generated and prepared into a temporary folder when
``--shards`` is absent), a memory of 100 training images per class and every validation image,
k = 1. Prints the best of ``--repeats`` runs (goal: under 10 s on the 2-core development
machine), the memory the stage would hold on real ImageNet (100 x 1000 training and 50,000
validation features of 4096 dimensions in float16), and a JSON line last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from itl_ray.models import AlexNet  # noqa: E402
from itl_ray.shards import PREPARE_KINDS, Prepared, prepared_paths  # noqa: E402
from itl_ray.transfer.induction import (InductionConfig, InductionRuntime, evaluate_induction,  # noqa: E402
                                        induction_data)


def mini_imagenet(shards: Path | None, folder: Path) -> Prepared:
    if shards is not None and (shards / "imagenet" / "PREPARED.json").is_file():
        return Prepared(shards / "imagenet", "imagenet")
    from itl_ray.datasets.synthetic import dataset_paths, synthesize
    from itl_ray.prepare import prepare

    raw = dataset_paths(synthesize(folder / "mini", seed=0))
    out = prepared_paths(folder / "shards")
    prepare(PREPARE_KINDS["imagenet"], raw["imagenet"], out["imagenet"])
    return Prepared(out["imagenet"], "imagenet")


def full_size_memory(train_images: int = 100 * 1000, val_images: int = 50_000, dim: int = 4096) -> dict:
    """Bytes of float16 features (the stage keeps the training ones, classifies validation ones batch
    by batch) and of one chunk of similarities and features (float32) at the default settings."""
    config, runtime = InductionConfig(), InductionRuntime()
    return {
        "train_features_mb": train_images * dim * 2 / 1e6,
        "val_features_mb_if_held": val_images * dim * 2 / 1e6,
        "similarity_chunk_mb": runtime.batch_size * runtime.classes_per_chunk * config.train_per_class * 4 / 1e6,
        "feature_chunk_mb": runtime.classes_per_chunk * config.train_per_class * dim * 4 / 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=Path, default=REPO / "data" / "mini-shards")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo's trials use 1)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        imagenet = mini_imagenet(args.shards, Path(folder))
        classes = sorted(set(imagenet.column("label")))
        config = InductionConfig(enabled=True)
        torch.manual_seed(0)
        model = AlexNet(len(classes), width=0.25, resolution=64, init="kaiming")
        times, cpu_times, output = [], [], None
        for _ in range(args.repeats):
            started, cpu_started = time.perf_counter(), time.process_time()
            data = induction_data(imagenet, classes, config.train_per_class, 0, "fine", len(classes))
            output = evaluate_induction(model, data, config, torch.device("cpu"), 0, log=lambda line: None)
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
        print(f"induction on the mini-benchmark: {len(classes)} classes, {len(data.train_rows):,} memory and "
              f"{len(data.val_rows):,} validation images, {args.threads} thread(s): best {min(times):.2f} s of "
              f"{', '.join(f'{t:.2f}' for t in times)} (goal: under 10 s); CPU time {min(cpu_times):.2f} s "
              "(what it takes when its cores are not shared)")
    memory = full_size_memory()
    print(f"real ImageNet: training features {memory['train_features_mb']:.1f} MB (kept), validation features "
          f"{memory['val_features_mb_if_held']:.1f} MB (classified batch by batch, never all held), chunks of "
          f"{memory['similarity_chunk_mb']:.1f} MB similarities and {memory['feature_chunk_mb']:.1f} MB features")
    print(json.dumps({"induction_mini_s": round(min(times), 3), "runs_s": [round(t, 3) for t in times],
                      "cpu_s": round(min(cpu_times), 3),
                      "threads": args.threads, "metrics": output.metrics, **memory}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
