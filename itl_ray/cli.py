"""The ``itl-ray`` command: parse arguments, call one function per subcommand, print user errors
as one line (``--debug`` keeps the traceback)."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from itl_ray.errors import UserError


def get_args_parser() -> argparse.ArgumentParser:
    """The ``itl-ray`` parser with its subcommands (contract: command line in the design)."""
    parser = argparse.ArgumentParser(prog="itl-ray", description="What makes ImageNet good for transfer learning?")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)

    sweep = commands.add_parser("sweep", help="run a sweep of trials with Ray Tune, tracked in MLflow")
    sweep.add_argument("spec", help="sweep spec YAML (see sweeps/)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set data.imagenet=/data/ilsvrc2012")
    sweep.add_argument("--dry-run", action="store_true", help="print the trials by experiment and a GPU-hour estimate only")
    sweep.add_argument("--img-per-s", type=float, default=None,
                       help="--dry-run: training images/s of AlexNet (width 1.0, 224 px) on one GPU (default: the last "
                            "`itl-ray bench --device cuda` result, else an assumed 25,000)")
    sweep.add_argument("--resume", action="store_true", help="continue the latest run of this sweep")

    trial = commands.add_parser("trial", help="run one trial of a sweep spec in this process, without Ray")
    trial.add_argument("spec", help="sweep spec YAML")
    trial.add_argument("--index", type=int, default=0, help="which of the spec's trials, numbered as --dry-run lists them")
    trial.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting of that trial (after the grid's values)")
    trial.add_argument("--no-track", action="store_true", help="print results only, no MLflow")
    trial.add_argument("--workdir", default=None, help="where the trial keeps its stages (default itl_runs/trials/<id>)")

    synth = commands.add_parser("synth", help="write the embedded mini-benchmark")
    synth.add_argument("out_dir")
    synth.add_argument("--seed", type=int, default=0)

    prepare = commands.add_parser("prepare", help="validate a dataset on disk and write its shards")
    prepare.add_argument("kind", help="imagenet, voc2007, voc2012-action or sun397")
    prepare.add_argument("root", help="the dataset's root: a local path or a pyarrow URI (s3://, gs://)")
    prepare.add_argument("out", help="folder for the shards, manifest and report")
    prepare.add_argument("--short-side", type=int, default=None,
                         help="stored shorter side in px, never upscaled; 0 keeps sizes (default: 256 for imagenet "
                              "and sun397, 0 for VOC)")
    prepare.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images")
    prepare.add_argument("--shard-size", type=int, default=1000, help="images per shard file")
    prepare.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")

    report = commands.add_parser("report", help="the study's tables, plots, confidence intervals and HTML page from "
                                                "MLflow")
    report.add_argument("--experiment", default=None, help="the sweep's name, its MLflow experiment (default: the "
                                                           "latest sweep's)")
    report.add_argument("--out", default=None, help="folder for report.html, tables, plots (default "
                                                    "itl_runs/report/EXPERIMENT)")
    report.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples of the test images for the confidence intervals (0: none)")
    report.add_argument("--no-log", action="store_true", help="do not log the report on the sweep's parent run")

    bench = commands.add_parser("bench", help="time the input pipeline + AlexNet training against the torchvision "
                                              "ImageFolder baseline, on generated images")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when there is one")
    bench.add_argument("--images", type=int, default=None, help="generated training images (CPU 1000, CUDA 10000)")
    bench.add_argument("--classes", type=int, default=None, help="classes (default 100)")
    bench.add_argument("--batch-size", type=int, default=None, help="CPU 64, CUDA 512")
    bench.add_argument("--resolution", type=int, default=None, help="crop side in px (CPU 64, CUDA 224)")
    bench.add_argument("--width", type=float, default=None, help="AlexNet channel multiplier (CPU 0.25, CUDA 1.0)")
    bench.add_argument("--model", choices=("itl", "torchvision"), default=None,
                       help="itl: the study's AlexNet (default); torchvision: torchvision.models.alexnet")
    bench.add_argument("--seconds", type=float, default=None, help="timed seconds per measurement (CPU 12, CUDA 10)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed steps first (CPU 3, CUDA 15)")
    bench.add_argument("--workers", type=int, default=None, help="DataLoader processes and decode threads "
                                                                  "(default: all cores)")
    bench.add_argument("--short-side", default=None, metavar="PX[,PX...]",
                       help="shorter side of the project's shards, one run each (default: 256/227 of the resolution)")
    bench.add_argument("--cpu-share", default=None, metavar="F[,F...]",
                       help="CUDA: fractions of each batch decoded by CPU threads, one run each (default 0,0.5)")
    bench.add_argument("--compile", choices=("auto", "on", "off"), default=None,
                       help="torch.compile the project's training step (auto: on CUDA)")
    bench.add_argument("--max-seconds", type=float, default=None,
                       help="skip project runs that would end later than this (the first always runs)")
    bench.add_argument("--work", default=None, help="keep the images and shards in this folder (reused next time)")

    labels = commands.add_parser("labels", help="write a WordNet label set as TSV")
    labels.add_argument("name", help="fine, up_down_<N>, down_up_<N>, pascal_removed, or a split name")
    labels.add_argument("--classes", default=None, help="file of wnids, one per line (default: ILSVRC-2012's 1000)")
    labels.add_argument("-o", "--out", default=None, help="output TSV (default: standard output)")
    return parser


def command_sweep(args) -> int:
    """``itl-ray sweep``: a dry run, or the sweep and its results table; 1 when a trial failed."""
    from itl_ray.config import load_spec, parse_overrides
    from itl_ray.sweep import dry_run, results_table, run_sweep

    spec = load_spec(args.spec, parse_overrides(args.overrides))
    if args.dry_run:
        print(dry_run(spec, args.img_per_s))
        return 0
    started = time.time()
    rows = run_sweep(spec, resume=args.resume)
    print()
    print(results_table(rows))
    from itl_ray.tracking import tracking_uri

    print(f"\n{len(rows)} trials in {time.time() - started:.0f} s; compare them with: "
          f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri())}; their report: itl-ray report --experiment "
          f"{shlex.quote(spec.trial.name)}")
    errors = [row for row in rows if "error" in row]
    for row in errors:
        print(f"error: trial {row['name']} failed: {row['error']}", file=sys.stderr)
    return 1 if errors else 0


def command_trial(args) -> int:
    """``itl-ray trial``: one trial of the spec (numbered as ``--dry-run`` lists them) in this
    process, tracked in MLflow unless ``--no-track``; prints the headline metrics."""
    from itl_ray.config import load_spec, override, parse_overrides, trial_id
    from itl_ray.sweep import ordered_trials
    from itl_ray.metrics import FINAL_METRICS, INDUCTION_METRICS
    from itl_ray.trial import read_inputs, run_trial

    trials = ordered_trials(load_spec(args.spec))
    if not 0 <= args.index < len(trials):
        raise UserError(f"--index {args.index}: {args.spec} has trials 0..{len(trials) - 1}")
    config = override(trials[args.index], parse_overrides(args.overrides))
    read_inputs(config)  # the prepared data checked (shards, partition), before anything is written
    tid = trial_id(config)
    workdir = Path(args.workdir) if args.workdir else Path("itl_runs/trials") / tid
    if args.no_track:
        final = run_trial(config, workdir, lambda kind, payload, step: None)
    else:
        from itl_ray.tracking import Tracker

        tracker = Tracker(config.name)
        run_id = tracker.trial_run(tid, f"trial-{tid}", None)

        try:
            final = run_trial(config, workdir, lambda kind, payload, step: tracker.record(run_id, kind, payload, step))
        except BaseException:
            tracker.finish(run_id, failed=True)
            raise
        tracker.finish(run_id)
        print(f"MLflow run {run_id} in {tracker.uri}")
    print("  ".join(f"{key} {final[key]:.1f}" for key in (*FINAL_METRICS, *INDUCTION_METRICS) if key in final))
    return 0


def command_synth(args) -> int:
    """``itl-ray synth``: write the mini-benchmark, with progress."""
    from itl_ray.datasets.synthetic import synthesize

    started = time.time()

    def progress(done, total):
        print(f"\rsynth: {done}/{total} images", end="" if done < total else "\n", flush=True)

    out = synthesize(args.out_dir, seed=args.seed, progress=progress)
    print(f"mini-benchmark in {out} ({time.time() - started:.1f} s)")
    return 0


def command_prepare(args) -> int:
    """``itl-ray prepare``: validate a dataset and write its shards, with progress on stderr."""
    from itl_ray.prepare import DEFAULT_SHORT_SIDE, PrepareSettings, prepare
    from itl_ray.shards import KINDS

    if args.kind not in KINDS:
        raise UserError(f"unknown dataset kind {args.kind!r}; use one of: {', '.join(KINDS)}")
    short_side = DEFAULT_SHORT_SIDE[args.kind] if args.short_side is None else args.short_side
    settings = PrepareSettings(short_side=short_side, quality=args.quality, shard_size=args.shard_size)
    started = time.time()

    def progress(done, total, skipped):
        print(f"\rprepare {args.kind}: {done:,}/{total:,} images, {skipped} skipped, {time.time() - started:.0f} s",
              end="" if done < total else "\n", file=sys.stderr, flush=True)

    info = prepare(args.kind, args.root, args.out, settings, workers=args.workers, progress=progress)
    print(f"{args.out}: {info['images']:,} {args.kind} images in {info['shards']} shards, {info['skipped']} skipped "
          f"(listed in {Path(args.out) / 'report.json'})")
    return 0


def command_report(args) -> int:
    """``itl-ray report``: the study's tables and plots from MLflow."""
    from itl_ray.report import report

    page = report(args.experiment, args.out, resamples=args.resamples, log_to_mlflow=not args.no_log)
    print(f"open it: {page.resolve().as_uri()}")
    return 0


def command_labels(args) -> int:
    """``itl-ray labels``: a label set as TSV (``label_sets.write_label_set``)."""
    from itl_ray.label_sets import write_label_set

    write_label_set(args.name, args.classes, args.out)
    return 0


def _numbers(text: str, kind, option: str) -> tuple:
    try:
        return tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"{option} expects comma-separated numbers, got {text!r}") from None


def command_bench(args) -> int:
    """``itl-ray bench``: the input pipeline + training step against the torchvision baseline;
    the last line printed is JSON."""
    import dataclasses
    import json

    import torch

    from itl_ray.bench import BenchSettings, run_bench

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = BenchSettings.defaults(device)
    given = {"images": args.images, "classes": args.classes, "batch_size": args.batch_size,
             "resolution": args.resolution, "width": args.width, "model": args.model, "seconds": args.seconds,
             "warmup": args.warmup, "workers": args.workers, "compile": args.compile, "work": args.work,
             "max_seconds": args.max_seconds}
    if args.short_side is not None:
        given["short_sides"] = _numbers(args.short_side, int, "--short-side")
    if args.cpu_share is not None:
        given["cpu_decode_shares"] = _numbers(args.cpu_share, float, "--cpu-share")
    settings = dataclasses.replace(settings, **{key: value for key, value in given.items() if value is not None})
    result = run_bench(settings, log=lambda line: print(line, flush=True))
    from itl_ray.cost import BENCH_RESULT
    from itl_ray.files import write_json

    BENCH_RESULT.parent.mkdir(parents=True, exist_ok=True)
    write_json(BENCH_RESULT, result)  # `itl-ray sweep --dry-run` estimates GPU-hours from a CUDA result
    print(json.dumps(result), flush=True)
    return 0


COMMANDS = {"sweep": command_sweep, "trial": command_trial, "synth": command_synth, "prepare": command_prepare,
            "report": command_report, "labels": command_labels, "bench": command_bench}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code: 0, 2 for a UserError (one line on stderr, the
    traceback only with ``--debug``), 130 when interrupted."""
    args = get_args_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, rerun to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
