#!/usr/bin/env bash
# The input-pipeline benchmark on a GPU machine, in one command from the repository root:
#
#   bash scripts/gpu_bench.sh              # about 6-7 minutes (each part has a time limit; at most 8)
#   bash scripts/gpu_bench.sh --cpu-smoke  # the same steps on a CPU in under a minute (tests/test_bench.py)
#   bash scripts/gpu_bench.sh --dry-run    # print the commands only
#
# Needs python with torch, torchvision, pyarrow, numpy and Pillow (nothing else; the project need
# not be installed: it runs as PYTHONPATH=. python -m itl_ray.cli). Parts, each under `timeout`:
#   1. itl-ray bench --device cuda: the study's AlexNet at 224 px, batch 512, bf16 + channels_last +
#      torch.compile; shards stored at 256 and 160 px shorter side; 0, 50 and 75% of each batch
#      decoded by CPU threads (the rest by nvJPEG); the torchvision ImageFolder baseline in the same run
#   2. the same with torchvision's AlexNet (the model of ../shared/reference/ANCHORS.md), reusing the images
#   3. ../shared/bench/gpu_anchor.py and gpu_naive_pipeline.py: the reference figures, same machine, same run
# Writes to $OUT (default itl_runs/gpu_bench-<date>): one log per part, gpu_anchor.json, table.md
# (markdown: card, date, every figure) and summary.json. Put table.md's figures into README.md.
set -u

MODE=gpu
for argument in "$@"; do
  case "$argument" in
    --cpu-smoke) MODE=smoke ;;
    --dry-run) MODE=dry ;;
    *) echo "usage: bash scripts/gpu_bench.sh [--cpu-smoke | --dry-run]" >&2; exit 2 ;;
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
OUT=${OUT:-itl_runs/gpu_bench-$(date +%Y%m%d-%H%M%S)}
WORK=${WORK:-${TMPDIR:-/tmp}/itl-gpu-bench}
if [ "$MODE" != dry ]; then mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

BENCH_DIR=""
for candidate in ../shared/bench shared/bench; do
  if [ -f "$candidate/gpu_anchor.py" ]; then BENCH_DIR=$(cd "$candidate" && pwd); break; fi
done

if [ "$MODE" != smoke ]; then
  # Time limits in seconds (total 480); the defaults fit an H100 with 16 cores.
  LIMIT_ITL=${LIMIT_ITL:-180} LIMIT_TV=${LIMIT_TV:-110} LIMIT_ANCHOR=${LIMIT_ANCHOR:-110} LIMIT_NAIVE=${LIMIT_NAIVE:-80}
  BENCH_ITL=(--device cuda --short-side 256,160 --cpu-share 0,0.5,0.75 --seconds 6 --work "$WORK"
             --max-seconds $((LIMIT_ITL - 25)))
  BENCH_TV=(--device cuda --model torchvision --short-side 256,160 --cpu-share 0.5 --seconds 6 --work "$WORK"
            --max-seconds $((LIMIT_TV - 20)))
  NAIVE_IMAGES=${NAIVE_IMAGES:-6000}
else
  LIMIT_ITL=120 LIMIT_TV=120 LIMIT_ANCHOR=0 LIMIT_NAIVE=0
  SMALL=(--device cpu --images 240 --classes 8 --batch-size 16 --seconds 1 --warmup 2 --work "$WORK-smoke")
  BENCH_ITL=("${SMALL[@]}" --resolution 48 --width 0.125)
  BENCH_TV=("${SMALL[@]}" --resolution 64 --model torchvision)
  NAIVE_IMAGES=0
fi

run() {  # run NAME LIMIT COMMAND...: log to $OUT/NAME.log, status to $OUT/NAME.status
  local name=$1 limit=$2; shift 2
  if [ "$MODE" = dry ]; then echo "[$name, limit ${limit} s] $*"; return 0; fi
  if [ "$limit" -le 0 ]; then echo "skipped" > "$OUT/$name.status"; echo "$name: skipped"; return 0; fi
  echo "$name: $* (limit ${limit} s)"
  local started=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local status=$?
  echo "exit $status after $((SECONDS - started)) s" > "$OUT/$name.status"
  echo "$name: exit $status after $((SECONDS - started)) s"
  tail -n 3 "$OUT/$name.log" | cut -c1-300
}

[ "$MODE" = dry ] || {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  echo "cores: $(nproc 2>/dev/null)"
  "$PYTHON" -c "import torch, torchvision as tv; print('torch', torch.__version__, 'torchvision', tv.__version__,
                'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} > "$OUT/machine.txt" 2>&1
[ "$MODE" = dry ] || cat "$OUT/machine.txt"

run bench_itl "$LIMIT_ITL" "$PYTHON" -m itl_ray.cli bench "${BENCH_ITL[@]}"
run bench_torchvision "$LIMIT_TV" "$PYTHON" -m itl_ray.cli bench "${BENCH_TV[@]}"
if [ -n "$BENCH_DIR" ]; then
  run gpu_anchor "$LIMIT_ANCHOR" env OUT="$OUT" "$PYTHON" "$BENCH_DIR/gpu_anchor.py"
  run gpu_naive_pipeline "$LIMIT_NAIVE" env N="$NAIVE_IMAGES" "$PYTHON" "$BENCH_DIR/gpu_naive_pipeline.py"
else
  echo "no ../shared/bench or shared/bench here: reference scripts not run" | tee "$OUT/gpu_anchor.status"
fi
[ "$MODE" = dry ] && exit 0

"$PYTHON" - "$OUT" <<'PY'
"""table.md and summary.json from the parts' logs."""
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])


def last_json(name):
    path = out / f"{name}.log"
    if not path.is_file():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def status(name):
    path = out / f"{name}.status"
    return path.read_text().strip() if path.is_file() else "not run"


def number(value):
    return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


machine = (out / "machine.txt").read_text().strip().splitlines()
rows = []
summary = {"machine": machine}
for name, label in (("bench_itl", "the study's AlexNet"), ("bench_torchvision", "torchvision AlexNet")):
    result = last_json(name)
    summary[name] = result
    if not result:
        rows.append((f"itl-ray bench, {label}", "no result", status(name)))
        continue
    settings = f"{result['device_name']}, {result['resolution']} px, batch {result['batch_size']}"
    rows.append((f"{label}: model alone, data on the device", number(result["model_only_img_s"]),
                 settings + (", compiled" if result.get("compiled") else "")))
    rows.append((f"{label}: torchvision ImageFolder baseline, end to end", number(result["baseline_img_s"]),
                 f"DataLoader, {result['workers']} workers"))
    for variant in result["variants"]:
        share = variant.get("cpu_decode_share")
        rows.append((f"{label}: project pipeline, end to end", number(variant["img_s"]),
                     f"shards at {variant['short_side']} px" + ("" if share is None else f", {share:.0%} CPU-decoded")))
    rows.append((f"{label}: project loader alone", number(result["project_loader_img_s"]), "first variant"))
    rows.append((f"{label}: ratio, best project / baseline", f"{result['ratio']:.1f}x",
                 f"shards at {result['short_side']} px" + (f", {result['cpu_decode_share']:.0%} CPU-decoded"
                                                           if "cpu_decode_share" in result else "")))
    if "peak_gpu_mem_gib" in result:
        rows.append((f"{label}: peak GPU memory, project runs", f"{result['peak_gpu_mem_gib']} GiB",
                     f"{result['peak_gpu_reserved_gib']} GiB reserved"))
anchor = out / "gpu_anchor.json"
if anchor.is_file():
    anchor_rows = json.loads(anchor.read_text()).get("rows", [])
else:  # stopped early: the figures it printed as it went
    anchor_rows = []
    log = out / "gpu_anchor.log"
    for line in (log.read_text(errors="replace").splitlines() if log.is_file() else []):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "name" in row and "value" in row:
            anchor_rows.append(row)
summary["gpu_anchor"] = anchor_rows
for row in anchor_rows:
    extra = ", ".join(f"{k}={v}" for k, v in row.items() if k not in ("name", "value", "unit"))
    rows.append((f"anchor: {row['name']}", number(row["value"]), extra))
if not anchor_rows or not anchor.is_file():
    rows.append(("anchor: gpu_anchor.py", "incomplete" if anchor_rows else "no result", status("gpu_anchor")))
naive = last_json("gpu_naive_pipeline")
summary["gpu_naive_pipeline"] = naive
if naive:
    rows.append(("anchor: naive pipeline, loader alone", number(naive.get("loader_only_img_s")),
                 f"{naive.get('workers')} workers"))
    rows.append(("anchor: naive pipeline + AlexNet, end to end", number(naive.get("end_to_end_img_s")),
                 "torchvision alexnet, bf16, channels_last"))
else:
    rows.append(("anchor: gpu_naive_pipeline.py", "no result", status("gpu_naive_pipeline")))
lines = ["# Input pipeline benchmark", ""] + [f"    {line}" for line in machine] + [
    "", "| figure | img/s | settings |", "|---|---|---|"]
lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
(out / "table.md").write_text("\n".join(lines) + "\n")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print("\n".join(lines))
PY
echo "results in $OUT"
