"""The ``itl-ray`` command: parse arguments, call one function per subcommand, print user errors
as one line (``--debug`` keeps the traceback)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from itl_ray.errors import Interrupted, UserError
from itl_ray.files import describe_disk_error, disk_error


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions and examples as written, and ends each option's help with its
    default where the help does not say it already (flags: "default: off")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0 and action.const is True:
            return f"{text} (default: off)"
        if action.default not in (None, []):
            return f"{text} (default: %(default)s)"
        return text


def version_text() -> str:
    """``itl-ray 0.1.0 (Python 3.11.2; torch 2.14.1, ray 2.60.0, mlflow 3.17.0)``: the versions an
    issue report needs, read from the installed packages' metadata (nothing is imported)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from itl_ray import __version__

    def installed(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    libraries = ", ".join(installed(name) for name in ("torch", "torchvision", "ray", "mlflow"))
    return f"itl-ray {__version__} (Python {platform.python_version()}; {libraries})"


def _command(commands, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` gives ``description`` and ``examples``."""
    return commands.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.\n\n{description}",
                               epilog=f"examples:\n{examples}", formatter_class=HelpFormatter)


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a command line it cannot parse is one line on stderr (exit code 2)
    naming the command and its ``--help``, not argparse's usage block; its subcommands are Parsers too."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def get_args_parser() -> argparse.ArgumentParser:
    """The ``itl-ray`` parser with its subcommands (contract: command line in the design)."""
    parser = Parser(
        prog="itl-ray", formatter_class=HelpFormatter,
        description="What makes ImageNet good for transfer learning? Pretrain AlexNet on ImageNet subsets\n"
                    "(Ray Tune sweeps), measure how well it transfers to VOC 2007 detection, VOC 2012 actions\n"
                    "and SUN397 scenes, and compare the runs in MLflow.",
        epilog="start here (after `make demo`, with `source .venv/bin/activate`):\n"
               "  itl-ray sweep sweeps/smoke.yaml --dry-run    # the trials of the demo's sweep\n"
               "  itl-ray sweep sweeps/smoke.yaml              # run it: a results table, then MLflow\n"
               "  itl-ray report --experiment smoke            # the study's tables and plots\n"
               "`itl-ray COMMAND --help` describes each command.")
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sweep = _command(
        commands, "sweep", "run a sweep of trials with Ray Tune, tracked in MLflow",
        "Every trial of the spec's grid (and its extra trials) pretrains AlexNet on its ImageNet subset,\n"
        "then runs the three transfer evaluations. Trials run on the local Ray instance, or on the\n"
        "cluster that RAY_ADDRESS or `ray start` names; results go to MLflow (MLFLOW_TRACKING_URI, else\n"
        "itl_runs/mlflow.db here). Ends with a table of the headline metrics and how to open MLflow's UI.\n"
        "Bad settings or data paths stop it before any trial starts.",
        "  itl-ray sweep sweeps/smoke.yaml\n"
        "  itl-ray sweep sweeps/smoke.yaml --dry-run\n"
        "  itl-ray sweep sweeps/images_per_class.yaml --set data.imagenet=/data/shards/imagenet\n"
        "  itl-ray sweep sweeps/smoke.yaml --set 'grid.pretrain.images_per_class=[50,100]' --set pretrain.epochs=20\n"
        "  itl-ray sweep sweeps/smoke.yaml --resume")
    sweep.add_argument("spec", help="sweep spec YAML (see sweeps/)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting of the spec (repeatable; values are YAML; grid.KEY sets a grid "
                            "axis), e.g. --set data.imagenet=/data/ilsvrc2012 (default: none)")
    sweep.add_argument("--dry-run", action="store_true",
                       help="print the trials by experiment and a GPU-hour estimate; run nothing")
    sweep.add_argument("--img-per-s", type=float, default=None,
                       help="--dry-run: training images/s of AlexNet (width 1.0, 224 px) on one GPU (default: the last "
                            "`itl-ray bench --device cuda` result, else an assumed 25,000)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the latest run of this sweep: finished stages are skipped, no run is added")

    trial = _command(
        commands, "trial", "run one trial of a sweep spec in this process, without Ray",
        "For debugging, and for measuring a whole trial on one GPU machine. Tracked in MLflow as a run of\n"
        "the spec's experiment unless --no-track; --no-track needs neither Ray nor MLflow.",
        "  itl-ray trial sweeps/smoke.yaml --index 0 --no-track\n"
        "  itl-ray trial sweeps/smoke.yaml --index 4 --set pretrain.epochs=2")
    trial.add_argument("spec", help="sweep spec YAML")
    trial.add_argument("--index", type=int, default=0,
                       help="which of the spec's trials, numbered as --dry-run lists them")
    trial.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting of that trial, after the grid's values (default: none)")
    trial.add_argument("--no-track", action="store_true", help="print results only, no MLflow")
    trial.add_argument("--workdir", default=None,
                       help="where the trial keeps its stages (default: itl_runs/trials/TRIAL_ID)")

    synth = _command(
        commands, "synth", "write the embedded mini-benchmark",
        "A small generated ImageNet, VOC 2007, VOC 2012 actions and SUN397 in their real on-disk\n"
        "formats (about 41 MB), for running everything without the real datasets; prepare each with\n"
        "`itl-ray prepare` next (`make demo` does both).",
        "  itl-ray synth data/mini")
    synth.add_argument("out_dir",
                       help="folder to write: new or empty (one holding the same mini-benchmark is kept as it is)")
    synth.add_argument("--seed", type=int, default=0, help="seed of the generator")

    prepare = _command(
        commands, "prepare", "validate a dataset on disk and write its shards",
        "Checks the whole dataset first, then writes resized JPEGs into Arrow shards with a manifest,\n"
        "which trials read by row. Interrupted runs resume; running it again on a finished folder\n"
        "does nothing. Kinds: imagenet, voc2007, voc2012-action, sun397.",
        "  itl-ray prepare imagenet /data/ILSVRC2012 /data/shards/imagenet\n"
        "  itl-ray prepare voc2007 /data/VOCdevkit /data/shards/voc2007\n"
        "  itl-ray prepare sun397 s3://bucket/SUN397 /data/shards/sun397")
    prepare.add_argument("kind", help="imagenet, voc2007, voc2012-action or sun397")
    prepare.add_argument("root", help="the dataset's root: a local path or a pyarrow URI (s3://, gs://)")
    prepare.add_argument("out", help="folder for the shards, manifest and report")
    prepare.add_argument("--short-side", type=int, default=None,
                         help="stored shorter side in px, never upscaled; 0 keeps sizes (default: 256 for imagenet "
                              "and sun397, 0 for VOC)")
    prepare.add_argument("--quality", type=int, default=90, help="JPEG quality of the stored images")
    prepare.add_argument("--shard-size", type=int, default=1000, help="images per shard file")
    prepare.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    prepare.add_argument("--proposal-ks", default=None,
                         help="voc2007: Selective Search segmentation thresholds k, comma-separated (default 50,100)")
    prepare.add_argument("--proposal-min-side", type=int, default=None,
                         help="voc2007: drop proposals narrower or lower than this many px (default 20)")
    prepare.add_argument("--proposal-max-boxes", type=int, default=None,
                         help="voc2007: proposals kept per image, best first (default and most 2000)")
    prepare.add_argument("--no-proposals", action="store_true",
                         help="voc2007: store no Selective Search proposals (hours on a few cores for all of "
                              "VOC 2007); the folder then serves transfer.detection.proposals: sliding_window "
                              "only, and preparing it again without this flag adds them in place")

    report = _command(
        commands, "report", "the study's tables, plots, confidence intervals and HTML page from MLflow",
        "Reads the latest sweep of an experiment from the MLflow store (MLFLOW_TRACKING_URI, else\n"
        "itl_runs/mlflow.db here) and writes report.html with the results tables (CSV, Markdown), the\n"
        "plots and paired-bootstrap confidence intervals over the test images; the report is also\n"
        "logged on the sweep's parent run.",
        "  itl-ray report\n"
        "  itl-ray report --experiment smoke --out itl_runs/report/smoke --resamples 200")
    report.add_argument("--experiment", default=None,
                        help="the sweep's name, its MLflow experiment (default: the latest sweep's)")
    report.add_argument("--out", default=None,
                        help="folder for report.html, tables, plots (default: itl_runs/report/EXPERIMENT)")
    report.add_argument("--resamples", type=int, default=1000,
                        help="bootstrap resamples of the test images for the confidence intervals (0: none)")
    report.add_argument("--no-log", action="store_true", help="do not log the report on the sweep's parent run")

    bench = _command(
        commands, "bench", "time the input pipeline + AlexNet training against the torchvision baseline",
        "On generated ImageNet-like JPEGs: the project's pipeline (shards, batched decode, crops on the\n"
        "device) and torchvision's ImageFolder + PIL DataLoader, each feeding the same training step,\n"
        "in one run. Prints both rates and their ratio; the last line is JSON. Defaults depend on the\n"
        "device: CPU runs the demo's quarter-width AlexNet at 64 px, CUDA the study's at 224 px.",
        "  itl-ray bench --device cpu\n"
        "  itl-ray bench --device cuda --short-side 256,160 --cpu-share 0,0.5")
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when there is one")
    bench.add_argument("--images", type=int, default=None, help="generated training images (default: CPU 1000, "
                                                                  "CUDA 10000)")
    bench.add_argument("--classes", type=int, default=None, help="classes (default: 100)")
    bench.add_argument("--batch-size", type=int, default=None, help="images per step (default: CPU 64, CUDA 512)")
    bench.add_argument("--resolution", type=int, default=None, help="crop side in px (default: CPU 64, CUDA 224)")
    bench.add_argument("--width", type=float, default=None,
                       help="AlexNet channel multiplier (default: CPU 0.25, CUDA 1.0)")
    bench.add_argument("--model", choices=("itl", "torchvision"), default=None,
                       help="itl: the study's AlexNet; torchvision: torchvision.models.alexnet (default: itl)")
    bench.add_argument("--seconds", type=float, default=None,
                       help="timed seconds per measurement (default: CPU 12, CUDA 10)")
    bench.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: CPU 3, CUDA 15)")
    bench.add_argument("--workers", type=int, default=None,
                       help="DataLoader processes and decode threads (default: all cores for the DataLoader, "
                            "the pipeline's own choice of decode threads)")
    bench.add_argument("--short-side", default=None, metavar="PX[,PX...]",
                       help="shorter side of the project's shards, one run each (default: 256/227 of the resolution)")
    bench.add_argument("--cpu-share", default=None, metavar="F[,F...]",
                       help="CUDA: fractions of each batch decoded by CPU threads, one run each (default: 0,0.5)")
    bench.add_argument("--compile", choices=("auto", "on", "off"), default=None,
                       help="torch.compile the project's training step (default: auto, on with CUDA)")
    bench.add_argument("--max-seconds", type=float, default=None,
                       help="skip project runs that would end later than this; the first always runs "
                            "(default: no limit)")
    bench.add_argument("--work", default=None,
                       help="keep the images and shards in this folder, reused next time (default: a temporary one)")

    labels = _command(
        commands, "labels", "write a WordNet label set as TSV",
        "The study's label sets over ImageNet classes: fine (each class its own label), up_down_N and\n"
        "down_up_N (classes merged to WordNet ancestors until N remain), pascal_removed, and the\n"
        "splits. Header wnid<TAB>group_wnid, one row per class. An N the algorithm does not produce is\n"
        "refused with the valid ones.",
        "  itl-ray labels up_down_127 -o up_down_127.tsv\n"
        "  itl-ray labels pascal_removed --classes my_wnids.txt")
    labels.add_argument("name", help="fine, parent, up_down_<N>, down_up_<N>, pascal_removed, or a split: "
                                     "random_a, random_b, minimal_a, minimal_b")
    labels.add_argument("--classes", default=None,
                        help="file of wnids, one per line (default: the 1000 classes of ILSVRC-2012)")
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
    try:
        rows = run_sweep(spec, resume=args.resume)
    except Interrupted as interrupted:
        again = shlex.join(["itl-ray", "sweep", args.spec, *(part for item in args.overrides for part in ("--set", item)),
                            "--resume"])
        interrupted.detail = "; ".join(filter(None, [interrupted.detail, f"continue with: {again}"]))
        raise
    print()
    print(results_table(rows))
    from itl_ray.progress import duration
    from itl_ray.tracking import ui_hint

    print(f"\n{len(rows)} trials in {duration(time.time() - started)}. Compare them in MLflow's UI:\n"
          f"  {ui_hint(spec.trial.name)}\n"
          f"Their report: itl-ray report --experiment {shlex.quote(spec.trial.name)}")
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
        from itl_ray.tracking import Tracker, ui_hint
        from itl_ray.trial import PER_IMAGE, RECORD_FILES

        tracker = Tracker(config.name)
        run_id = tracker.trial_run(tid, f"trial-{tid}", None)

        try:
            final = run_trial(config, workdir, lambda kind, payload, step: tracker.record(run_id, kind, payload, step))
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: interrupted, to be continued by running it again
            tracker.finish(run_id, killed=True)
            raise
        except BaseException:
            tracker.finish(run_id, failed=True)
            raise
        tracker.log_trial_files(run_id, workdir, RECORD_FILES, (PER_IMAGE,))
        tracker.finish(run_id)
        print(f"MLflow run {run_id} in {tracker.uri}; look at it with:\n  {ui_hint(config.name)}")
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
    """``itl-ray prepare``: validate a dataset and write its shards (and, for VOC 2007, its
    Selective Search proposals), with progress on stderr."""
    from itl_ray.prepare import DEFAULT_SHORT_SIDE, PrepareSettings, prepare
    from itl_ray.proposals import ProposalSettings
    from itl_ray.shards import KINDS

    if args.kind not in KINDS:
        raise UserError(f"unknown dataset kind {args.kind!r}; use one of: {', '.join(KINDS)}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: give a number of processes of at least 1, or leave it out "
                        "for all cores")
    short_side = DEFAULT_SHORT_SIDE[args.kind] if args.short_side is None else args.short_side
    settings = PrepareSettings(short_side=short_side, quality=args.quality, shard_size=args.shard_size)
    proposal_options = {"ks": _numbers(args.proposal_ks, int, "--proposal-ks") if args.proposal_ks is not None else None,
                        "min_box_side": args.proposal_min_side, "max_boxes": args.proposal_max_boxes}
    proposal_options = {key: value for key, value in proposal_options.items() if value is not None}
    if proposal_options and args.kind != "voc2007":
        raise UserError(f"--proposal-* options apply to voc2007 only, not to {args.kind}")
    if args.no_proposals and args.kind != "voc2007":
        raise UserError(f"--no-proposals applies to voc2007 only, not to {args.kind}")
    if proposal_options and args.no_proposals:
        raise UserError("--proposal-* options were given with --no-proposals; give one or the other")
    with_proposals = args.kind == "voc2007" and not args.no_proposals
    proposal_settings = ProposalSettings(**proposal_options) if with_proposals else None
    started = time.time()

    def progress(done, total, skipped):
        print(f"\rprepare {args.kind}: {done:,}/{total:,} images, {skipped} skipped, {time.time() - started:.0f} s",
              end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        info = prepare(args.kind, args.root, args.out, settings, workers=args.workers, progress=progress,
                       proposal_settings=proposal_settings, proposals=not args.no_proposals)
    except OSError as error:
        full = disk_error(error)
        if full is None:
            raise
        print(file=sys.stderr)  # past the progress line
        raise UserError(f"cannot write {describe_disk_error(full, args.out)}; free space or make it writable, then "
                        "run the same command again: the shards written so far are kept") from None
    line = (f"{args.out}: {info['images']:,} {args.kind} images in {info['shards']} shards, {info['skipped']} skipped "
            f"(listed in {Path(args.out) / 'report.json'})")
    if with_proposals:
        proposals = json.loads((Path(args.out) / "report.json").read_text())["proposals"]
        recall = proposals["recall_iou_0.5"]["all"]["recall"]
        line += (f"; Selective Search: {proposals['boxes_per_image']['mean']} boxes per image, recall "
                 f"{'n/a' if recall is None else f'{100 * recall:.1f}%'} at IoU 0.5")
    print(line)
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


def _terminate(number: int, frame) -> None:
    raise Interrupted(number)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code: 0, 2 for a UserError (one line on stderr, the
    traceback only with ``--debug``), 128 + the signal's number when SIGINT (Ctrl-C: 130) or
    SIGTERM (143) stopped it, after one line on stderr."""
    args = get_args_parser().parse_args(argv)
    if not args.debug:
        # MLflow logs a traceback of every database error it then raises (a full or read-only
        # store); the error reaches the user once, as one line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM ends the work as Ctrl-C does
    previous = signal.SIG_DFL if previous is None else previous  # None: a handler not set from Python
    try:
        return COMMANDS[args.command](args)
    except UserError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of our output left (`itl-ray ... | head`): stop quietly, as shell tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 128 + signal.SIGPIPE
    except OSError as error:
        full = disk_error(error)
        if full is None or args.debug:
            raise
        print(f"error: cannot write {describe_disk_error(full)}; free space or make it writable, then run the same "
              "command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupted:
        number = getattr(interrupted, "signal_number", signal.SIGINT)
        detail = getattr(interrupted, "detail", "") or "finished stages are kept, rerun to continue"
        print(f"interrupted by {signal.Signals(number).name}: {detail}", file=sys.stderr)
        return 128 + number
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
