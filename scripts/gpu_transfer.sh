#!/usr/bin/env bash
# VOC 2007 detection fine-tuning with Fast R-CNN's CaffeNet recipe, timed on a GPU machine, in one
# command from the repository root:
#
#   bash scripts/gpu_transfer.sh              # about 6-7 minutes on 16 cores + one H100/H200 (each part has a limit; at most 8)
#   bash scripts/gpu_transfer.sh --cpu-smoke  # the same steps, tiny, on a CPU in a few minutes (tests/test_bench_transfer.py)
#   bash scripts/gpu_transfer.sh --dry-run    # print the commands only
#
# Needs python with torch, torchvision, pyarrow, numpy, Pillow, opencv-contrib-python-headless
# (prepare's Selective Search) and nltk with WordNet (the generated set's classes); the project
# need not be installed: it runs with PYTHONPATH=.. Parts, each under `timeout`:
#   1. generate a VOC-2007-sized set (5,011 trainval + 4,952 test images, 500 x 375 px, objects of
#      all sizes: synthesize_voc2007) and prepare it as `itl-ray prepare voc2007 --no-proposals`
#      does (all cores; no Selective Search, which this timing does not use);
#   2. the detection stage with the recipe (600 px, 2 images and 128 RoIs per step, the study's
#      full-width AlexNet at 227 px, random weights: speed does not depend on them) for
#      $ITERATIONS iterations and a test pass over $TEST_IMAGES test images, on the GPU, images
#      decoded by all cores but two.
# Proposals, for timing only: sliding windows at stride 0.18, about 2,000 per 500 x 375 image (as
# many as the Selective Search boxes the recipe scores), so the test pass costs what it would with
# them; computing Selective Search is prepare's cost, not the stage's, and is not timed here.
# The full recipe (40,000 iterations, 4,952 test images) is EXTRAPOLATED from the measured rates
# (stated as such in the results). Writes to $OUT (default itl_runs/gpu_transfer-<date>):
# machine.txt, one log and status per part, results.json (the stage's figures) and table.md.
set -u

MODE=gpu
for argument in "$@"; do
  case "$argument" in
    --cpu-smoke) MODE=smoke ;;
    --dry-run) MODE=dry ;;
    *) echo "usage: bash scripts/gpu_transfer.sh [--cpu-smoke | --dry-run]" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then  # the first python that has torch
  for candidate in python3 python .venv/bin/python; do
    if command -v "$candidate" > /dev/null && "$candidate" -c "import torch, torchvision, pyarrow" 2> /dev/null; then
      PYTHON=$candidate; break
    fi
  done
  PYTHON=${PYTHON:-python3}
fi
OUT=${OUT:-itl_runs/gpu_transfer-$(date +%Y%m%d-%H%M%S)}
WORK=${WORK:-${TMPDIR:-/tmp}/itl-gpu-transfer}
if [ "$MODE" != dry ]; then mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$MODE" != smoke ]; then
  # Time limits in seconds (total 470); the defaults fit an H100/H200 with 16 cores.
  LIMIT_DATA=${LIMIT_DATA:-150} LIMIT_DETECTION=${LIMIT_DETECTION:-320}
  ITERATIONS=${ITERATIONS:-2000} TEST_IMAGES=${TEST_IMAGES:-400}
  SET=(--trainval 5011 --test 4952)
  RUN=(--device cuda --iterations "$ITERATIONS" --test-images "$TEST_IMAGES" --window-stride 0.18)
else
  LIMIT_DATA=300 LIMIT_DETECTION=600
  ITERATIONS=40 TEST_IMAGES=3
  SET=(--trainval 24 --test 12 --workers 2)
  RUN=(--device cpu --iterations "$ITERATIONS" --test-images "$TEST_IMAGES" --threads 1 --width 0.125
       --resolution 48 --image-size 96 --max-size 160)
fi

run() {  # run NAME LIMIT COMMAND...: log to $OUT/NAME.log, status to $OUT/NAME.status
  local name=$1 limit=$2; shift 2
  if [ "$MODE" = dry ]; then echo "[$name, limit ${limit} s] $*"; return 0; fi
  echo "$name: $* (limit ${limit} s)"
  local started=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "exit $status after $((SECONDS - started)) s" > "$OUT/$name.status"
  echo "$name: exit $status after $((SECONDS - started)) s"
  tail -n 3 "$OUT/$name.log" | cut -c1-300
  return $status
}

[ "$MODE" = dry ] || {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  echo "cores: $(nproc 2>/dev/null)"
  "$PYTHON" -c "import torch, torchvision as tv; print('torch', torch.__version__, 'torchvision', tv.__version__,
                'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} > "$OUT/machine.txt" 2>&1
[ "$MODE" = dry ] || cat "$OUT/machine.txt"

# Part 1 alone prepares the data (the detection command finds it ready and only times the stage);
# the stage runs in a fresh process, so its memory figure is its own.
run data "$LIMIT_DATA" "$PYTHON" benchmarks/bench_transfer.py --parts detection --keep "$WORK" "${SET[@]}" --prepare-only
run detection "$LIMIT_DETECTION" "$PYTHON" benchmarks/bench_transfer.py --parts detection --keep "$WORK" "${SET[@]}" "${RUN[@]}"
[ "$MODE" = dry ] && exit 0

"$PYTHON" - "$OUT" <<'PY'
"""results.json and table.md from the detection log's last JSON line."""
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
result = None
log = out / "detection.log"
for line in reversed(log.read_text(errors="replace").splitlines() if log.is_file() else []):
    if line.startswith("{"):
        try:
            result = json.loads(line)["detection"]
            break
        except (ValueError, KeyError, TypeError):
            pass
status = {name: (out / f"{name}.status").read_text().strip() if (out / f"{name}.status").is_file() else "not run"
          for name in ("data", "detection")}
machine = (out / "machine.txt").read_text().strip().splitlines()
summary = {"machine": machine, "status": status, "detection": result}
(out / "results.json").write_text(json.dumps(summary, indent=1))
lines = ["# VOC 2007 detection, Fast R-CNN's CaffeNet recipe", ""] + [f"    {line}" for line in machine] + [""]
if result:
    full = result["extrapolated_full_recipe"]
    lines += ["| figure | value |", "|---|---|",
              f"| device | {result['device_name']} |",
              f"| network, images | {result['network']} |",
              f"| proposals | {result['proposals']} |",
              f"| training, measured | {result['train_it_s']} it/s over {result['iterations']} iterations |",
              f"| test pass, measured | {result['test_images_s']} images/s over {result['test_images']} images |",
              f"| peak GPU memory | {result.get('peak_gpu_memory_gib', '-')} GiB |",
              f"| peak resident memory | {result['peak_rss_gib']} GiB |",
              f"| full recipe, EXTRAPOLATED ({full['note']}) | train {full['train_minutes']} min + test "
              f"{full['test_minutes']} min = {full['total_minutes']} min |"]
else:
    lines += [f"no result: data {status['data']}, detection {status['detection']}"]
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo "results in $OUT"
