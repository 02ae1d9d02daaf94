"""Wall time of computing the study's 21 label sets for the 1000 ILSVRC-2012 classes, WordNet
loading included, in a fresh process (the cost a trial pays the first time it needs a set).

    python benchmarks/bench_label_sets.py [--repeat 3]

Each run starts a new Python interpreter (so nothing is cached), which imports itl_ray.label_sets,
loads WordNet 3.0 through nltk and computes the 21 published sets. Printed: each run's wall time
as seen from outside (interpreter start included), with the split the child measured itself,
then one JSON line with the median. The goal is under 10 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, time
start = time.perf_counter()
from itl_ray import ilsvrc2012, label_sets, wordnet
wordnet.load()
loaded = time.perf_counter()
classes = ilsvrc2012.wnids()
sets = {name: label_sets.label_set(name, classes) for name in label_sets.PUBLISHED_LABEL_SETS}
done = time.perf_counter()
print(json.dumps({"import_and_load_s": loaded - start, "sets_s": done - loaded, "sets": len(sets)}))
"""


def one_run() -> dict:
    """One fresh process; its wall time from outside and its own split of the time."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"the child process failed:\n{result.stderr}")
    return {"wall_s": wall, **json.loads(result.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes to time (default 3)")
    args = parser.parse_args()
    runs = []
    for index in range(args.repeat):
        run = one_run()
        runs.append(run)
        print(
            f"run {index + 1}: {run['sets']} label sets, 1000 classes: {run['wall_s']:.2f} s wall "
            f"(import + WordNet load {run['import_and_load_s']:.2f} s, sets {run['sets_s']:.2f} s)"
        )
    walls = [run["wall_s"] for run in runs]
    summary = {
        "median_wall_s": round(statistics.median(walls), 3),
        "min_wall_s": round(min(walls), 3),
        "median_sets_s": round(statistics.median(run["sets_s"] for run in runs), 3),
        "runs": len(runs),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
