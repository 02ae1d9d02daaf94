"""`itl-ray report`: the study's answers from MLflow, for the latest sweep of an experiment.

    itl-ray report [--experiment NAME] [--out DIR] [--resamples N]
    python analysis/report.py ...            (the same)

Reads the sweep's trial runs (one ``mlflow.search_runs`` call) and writes, per experiment of
the study in that sweep (its trials' experiment tags, see ``config.SweepSpec``):

- ``<experiment>.md`` and ``<experiment>.csv``: one row per point (the trial settings without the
  seed), each metric as mean +- standard deviation over the seeds with their number n; missing
  runs or metrics are shown as missing, never as 0; points with fewer finished seeds than planned,
  and sweeps not finished, are marked;
- ``<experiment>.png``: each transfer metric along the experiment's axis, error bars over seeds,
  the random-initialisation control as a horizontal line, the study's published figures as a
  series labelled "published" where it has them at these points (``itl_ray/plots.py``);
- ``<experiment>_comparisons.csv`` (also in the .md): the differences the study asks about
  (``itl_ray/study.py``), each with a 95% confidence interval over test images (paired bootstrap
  on the trials' per-image scores, ``itl_ray/bootstrap.py``) and one over seeds; "no significant
  difference" only where the interval covers 0; an interval that cannot be computed is left out
  with the reason;
- ``report.html``: all of it on one self-contained page; ``trials.csv``: every trial run read.

The files are also logged on the sweep's parent run (artifact folder ``report/``). Reading never
writes to the store: an experiment that is not there is an error that lists those that are.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from itl_ray import bootstrap, study, tables
from itl_ray.errors import UserError
from itl_ray.files import write_atomically
from itl_ray.per_image import FOLDER as PER_IMAGE
from itl_ray.resampling import NO_SCORES, TrialResamples, image_interval

DEFAULT_OUT = Path("itl_runs/report")  # the report of experiment NAME goes to DEFAULT_OUT / NAME
PARAMS = ("label_set", "num_classes", "source_classes", "images_per_class", "pretrain_images", "seed")
NUMERIC = ("num_classes", "source_classes", "images_per_class", "pretrain_images", "seed")


# ---------------------------------------------------------------------------------------------
# Runs -> trials -> points
# ---------------------------------------------------------------------------------------------

def trial_table(runs: pd.DataFrame, default_experiment: str) -> pd.DataFrame:
    """One row per trial run: run_id, status, experiments (tuple), point, point_id, the params of
    ``PARAMS`` (numbers where numeric) and the metrics of ``study.METRICS`` (NaN where missing).
    Runs from before experiment tags count for ``default_experiment``, one point per run."""
    from itl_ray.tracking import EXPERIMENTS, POINT, POINT_ID

    def column(name: str) -> pd.Series:
        return runs[name] if name in runs.columns else pd.Series([None] * len(runs), index=runs.index, dtype=object)

    run_name = column("tags.mlflow.runName").fillna(column("run_id"))
    tagged = column(f"tags.{EXPERIMENTS}")
    frame = pd.DataFrame({
        "run_id": column("run_id"),
        "artifact_uri": column("artifact_uri"),
        "status": column("status"),
        "experiments": [tuple(value.split(",")) if isinstance(value, str) and value else (default_experiment,)
                        for value in tagged],
        "point": column(f"tags.{POINT}").fillna(run_name),
        "point_id": column(f"tags.{POINT_ID}").fillna(run_name),
    })
    for name in PARAMS:
        values = column(f"params.{name}")
        frame[name] = pd.to_numeric(values, errors="coerce") if name in NUMERIC else values
    for name in study.METRICS:
        frame[name] = pd.to_numeric(column(f"metrics.{name}"), errors="coerce")
    return frame.reset_index(drop=True)


def planned_seeds(plan: list[dict] | None) -> dict[str, int]:
    """Point id -> number of trials (seeds) the sweep planned for it."""
    counts: dict[str, int] = {}
    for trial in plan or []:
        counts[trial["point_id"]] = counts.get(trial["point_id"], 0) + 1
    return counts


def summarize(trials: pd.DataFrame, metrics: tuple[str, ...], planned: dict[str, int]) -> pd.DataFrame:
    """One row per point: its params (pretrain_images as the mean over its runs), ``runs``,
    ``planned`` (seeds the sweep planned; runs found when the plan is unknown), and per metric
    ``<m>_mean``, ``<m>_std`` (NaN below two values) and ``<m>_n`` (runs that have it)."""
    rows = []
    for point_id, group in trials.groupby("point_id", sort=False):
        row = {"point_id": point_id, "point": group["point"].iloc[0], "runs": len(group),
               "planned": planned.get(point_id, len(group)), "seeds": sorted(int(s) for s in group["seed"].dropna())}
        for name in ("label_set", "num_classes", "source_classes", "images_per_class"):
            known = group[name].dropna()
            row[name] = known.iloc[0] if len(known) else None
        row["pretrain_images"] = group["pretrain_images"].mean()
        for metric in metrics:
            values = group[metric].dropna()
            row[f"{metric}_mean"] = values.mean() if len(values) else math.nan
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
            row[f"{metric}_n"] = len(values)
        rows.append(row)
    return pd.DataFrame(rows)


def is_control(points: pd.DataFrame) -> pd.Series:
    """Random-initialisation points (no pretraining images)."""
    return points["images_per_class"] == 0


def point_label(row, layout: str) -> str:
    """How a point is named in tables and plots."""
    if row["images_per_class"] == 0:
        return "control: random init"
    classes = f"{_integer(row['num_classes'])} classes"
    if layout == "images_per_class":
        return f"{_integer(row['images_per_class'])} images/class"
    if layout in ("classes", "induction"):
        return f"{row['label_set']} ({classes})"
    if layout == "budget":
        return f"{_integer(row['source_classes'])} classes x {_integer(row['images_per_class'])}"
    if layout == "categories":
        return f"{row['label_set']} ({classes})"
    return str(row["point"])


def _integer(value) -> str:
    return "?" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{int(value)}"


def order_points(points: pd.DataFrame, experiment: study.Experiment) -> pd.DataFrame:
    """Points in reading order for the experiment's layout, the control last."""
    if points.empty:
        return points
    points = points.copy()
    points["budget"] = points["source_classes"] * points["images_per_class"]
    keys = {
        "images_per_class": (["images_per_class"], [False]),
        "classes": (["num_classes"], [False]),
        "induction": (["num_classes"], [False]),
        "budget": (["budget", "source_classes"], [False, False]),
        "generic": (["pretrain_images"], [False]),
    }
    if experiment.layout == "categories":
        names = ["fine", *[name for pair in experiment.pairs for name in pair]]
        points["_rank"] = points["label_set"].map(lambda value: names.index(value) if value in names else len(names))
        by, ascending = ["_rank"], [True]
    else:
        by, ascending = keys[experiment.layout]
    points["_control"] = is_control(points)
    points = points.sort_values(["_control", *by], ascending=[True, *ascending], kind="stable")
    return points.drop(columns=[c for c in ("_rank", "_control") if c in points.columns]).reset_index(drop=True)


def comparisons(points: pd.DataFrame, experiment: study.Experiment) -> list[study.Comparison]:
    """The pairs the study compares in this experiment (A - B), from the points there are."""
    pretrained = points[~is_control(points)]
    control = points[is_control(points)]
    found: list[study.Comparison] = []

    def add(a, b, label: str, metrics=None) -> None:
        if a["point_id"] != b["point_id"]:
            found.append(study.Comparison(a["point_id"], b["point_id"], label, metrics or experiment.metrics))

    rows = [row for _, row in pretrained.iterrows()]
    if not rows:
        return found
    layout = experiment.layout
    if layout == "images_per_class":
        reference = max(rows, key=lambda row: row["images_per_class"])
        for row in rows:
            add(row, reference, f"{_integer(row['images_per_class'])} vs {_integer(reference['images_per_class'])} "
                                "images per class")
    elif layout in ("classes", "induction"):
        fine = [row for row in rows if row["label_set"] == "fine"]
        reference = max(fine or rows, key=lambda row: (row["num_classes"], row["pretrain_images"]))
        for row in rows:
            add(row, reference, f"{point_label(row, layout)} vs {point_label(reference, layout)}")
    elif layout == "budget":
        budgets: dict[float, list] = {}
        for row in rows:
            budgets.setdefault(row["source_classes"] * row["images_per_class"], []).append(row)
        for members in budgets.values():
            reference = max(members, key=lambda row: row["source_classes"])
            for row in members:
                add(row, reference, f"{point_label(row, layout)} vs {point_label(reference, layout)}")
    elif layout == "categories":
        by_set = {row["label_set"]: row for row in rows}
        for a, b in experiment.pairs:
            if a in by_set and b in by_set:
                add(by_set[a], by_set[b], f"{a} vs {b}")
    else:  # generic: each pretraining against random initialisation
        for _, reference in control.iterrows():
            for row in rows:
                add(row, reference, f"{row['point']} vs random init")
    return found


# ---------------------------------------------------------------------------------------------
# One experiment
# ---------------------------------------------------------------------------------------------

@dataclass
class Section:
    experiment: study.Experiment
    points: pd.DataFrame  # summarize() rows in reading order, with "label"
    table: pd.DataFrame  # for people (Markdown, HTML)
    numbers: pd.DataFrame  # for programs (CSV)
    comparisons: pd.DataFrame
    published: list[study.PublishedValue]
    notes: list[str] = field(default_factory=list)
    figure: Path | None = None


def _cell(mean: float, std: float, n: int, planned: int) -> str:
    if n == 0:
        return tables.MISSING
    text = f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"
    return f"{text} (n={n}{f' of {planned}' if n < planned else ''})"


def _interval_text(interval: bootstrap.Interval) -> str:
    return "-" if interval.low is None else f"[{interval.low:+.2f}, {interval.high:+.2f}]"


def published_for(experiment: study.Experiment, points: pd.DataFrame) -> list[tuple[str, study.PublishedValue]]:
    """(point id, published value) for the study's values at points of this sweep."""
    found = []
    for value in study.PUBLISHED_VALUES:
        if value.experiment != experiment.name:
            continue
        for _, row in points.iterrows():
            if study.matches(row.to_dict(), value.point):
                found.append((row["point_id"], value))
    return found


def section(experiment: study.Experiment, trials: pd.DataFrame, planned: dict[str, int],
            scores: TrialResamples | None) -> Section:
    mine = trials[trials["experiments"].map(lambda names: experiment.name in names)]
    metrics = tuple(dict.fromkeys(("pretrain_top1", *study.TRANSFER_METRICS, *experiment.metrics)))
    points = order_points(summarize(mine, metrics, planned), experiment)
    notes = []
    if not points.empty:
        points["label"] = [point_label(row, experiment.layout) for _, row in points.iterrows()]
    published = published_for(experiment, points) if not points.empty else []
    published_by = {(point_id, value.metric): value for point_id, value in published}

    table_rows, number_rows = [], []
    for _, row in points.iterrows():
        cells = {"point": row["label"], "label set": row["label_set"], "classes": row["num_classes"],
                 "images/class": row["images_per_class"], "pretraining images": row["pretrain_images"]}
        numbers = {"point": row["label"], "point_id": row["point_id"], "label_set": row["label_set"],
                   "num_classes": row["num_classes"], "source_classes": row["source_classes"],
                   "images_per_class": row["images_per_class"], "pretrain_images": row["pretrain_images"],
                   "runs": row["runs"], "planned": row["planned"]}
        for metric in metrics:
            cells[metric] = _cell(row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_n"], row["planned"])
            numbers.update({f"{metric}_mean": row[f"{metric}_mean"], f"{metric}_std": row[f"{metric}_std"],
                            f"{metric}_n": row[f"{metric}_n"]})
            value = published_by.get((row["point_id"], metric))
            if any(m == metric for _, m in published_by):
                cells[f"published {metric}"] = f"{value.value:.1f}" if value else "-"
                numbers[f"published_{metric}"] = value.value if value else math.nan
        table_rows.append(cells)
        number_rows.append(numbers)
    table = pd.DataFrame(table_rows)
    for column in ("classes", "images/class", "pretraining images"):
        if column in table:
            table[column] = table[column].map(lambda v: tables.MISSING if v is None or v != v else f"{int(round(v)):,}")

    short = points[points["runs"] < points["planned"]] if not points.empty else points
    if len(short):
        notes.append(f"partial: {len(short)} point(s) have fewer finished runs than planned seeds "
                     f"(cells say n=found of planned)")
    for metric in experiment.metrics:
        if not points.empty and (points[f"{metric}_n"] == 0).all():
            notes.append(f"{metric}: no run of this experiment has it (missing in every row)")

    rows = []
    by_point = {row["point_id"]: row for _, row in points.iterrows()}
    for comparison in comparisons(points, experiment):
        a, b = by_point[comparison.a], by_point[comparison.b]
        side_a, side_b = mine[mine["point_id"] == comparison.a], mine[mine["point_id"] == comparison.b]
        for metric in comparison.metrics:
            a_values = side_a.dropna(subset=[metric])
            b_values = side_b.dropna(subset=[metric])
            if a_values.empty or b_values.empty:
                rows.append({"comparison": comparison.label, "metric": metric, "A − B": math.nan,
                             "95% CI, test images": "-", "A vs B (images)": "no interval",
                             "95% CI, seeds": "-", "A vs B (seeds)": "no interval",
                             "published A − B": _published_difference(experiment, metric, a, b),
                             "why no interval": f"{metric} missing on a side"})
                continue
            estimate = float(a_values[metric].mean() - b_values[metric].mean())
            images = image_interval(a_values, b_values, metric, estimate, scores)
            seeds = bootstrap.seed_interval(dict(zip(a_values["seed"].astype(int), a_values[metric])),
                                            dict(zip(b_values["seed"].astype(int), b_values[metric])))
            image_reason = "no per-image scores (see the note)" if images.note.startswith(NO_SCORES) else images.note
            reasons = [f"images: {image_reason}" if images.low is None else "",
                       f"seeds: {seeds.note}" if seeds.low is None else ""]
            rows.append({"comparison": comparison.label, "metric": metric, "A − B": estimate,
                         "95% CI, test images": _interval_text(images), "A vs B (images)": images.verdict,
                         "95% CI, seeds": _interval_text(seeds), "A vs B (seeds)": seeds.verdict,
                         "published A − B": _published_difference(experiment, metric, a, b),
                         "why no interval": "; ".join(r for r in reasons if r) or "-",
                         "_images": images, "_seeds": seeds})
    compared = pd.DataFrame(rows)
    missing = scores.without_scores(mine["run_id"]) if scores is not None else 0
    if missing:
        notes.append(f"Intervals over test images are left out where a side lacks per-image scores: {missing} of "
                     f"{len(mine)} trial runs of this experiment have no {PER_IMAGE}/ artifacts (the transfer stages "
                     "write them; see docs/report.md). The intervals over seeds do not need them.")
    return Section(experiment, points, table, pd.DataFrame(number_rows), compared, [v for _, v in published], notes)


def _published_difference(experiment: study.Experiment, metric: str, a, b) -> str:
    for difference in study.PUBLISHED_DIFFERENCES:
        if (difference.experiment == experiment.name and difference.metric == metric
                and study.matches(a.to_dict(), difference.a) and study.matches(b.to_dict(), difference.b)):
            value = "" if difference.value is None else f"{difference.value:+.1f}"
            return " ".join(part for part in (value, f"({difference.note})" if difference.note else "") if part)
    return "-"


def comparisons_for_files(compared: pd.DataFrame) -> pd.DataFrame:
    return compared.drop(columns=[c for c in ("_images", "_seeds") if c in compared.columns])


def comparisons_csv(compared: pd.DataFrame) -> pd.DataFrame:
    """Numbers for programs: the intervals as low/high columns."""
    rows = []
    for _, row in compared.iterrows():
        images, seeds = row.get("_images"), row.get("_seeds")
        rows.append({"comparison": row["comparison"], "metric": row["metric"], "difference": row["A − B"],
                     "images_low": getattr(images, "low", None), "images_high": getattr(images, "high", None),
                     "images_verdict": row["A vs B (images)"],
                     "seeds_low": getattr(seeds, "low", None), "seeds_high": getattr(seeds, "high", None),
                     "seeds_verdict": row["A vs B (seeds)"], "published": row["published A − B"],
                     "why_no_interval": row["why no interval"]})
    return pd.DataFrame(rows)


def markdown(section_: Section, sweep_line: str) -> str:
    e = section_.experiment
    parts = [f"# {e.title} ({e.name})", "", e.question, "", sweep_line, "",
             "Cells: mean ± standard deviation over seeds (n = runs with that metric; 'n=2 of 3': a seed is "
             "missing). Metrics in percent.", "", tables.to_markdown(section_.table), ""]
    if e.claims:
        parts += ["Published (Huh, Agrawal, Efros 2016):", *[f"- {claim}" for claim in e.claims], ""]
    if not section_.comparisons.empty:
        parts += ["## Comparisons (A − B, 95% confidence intervals)", "",
                  tables.to_markdown(comparisons_for_files(section_.comparisons), digits=2), ""]
    if section_.notes:
        parts += ["Notes:", *[f"- {note}" for note in section_.notes], ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

def report(experiment: str | None = None, out: str | Path | None = None, resamples: int = bootstrap.RESAMPLES,
           log=print, log_to_mlflow: bool = True) -> Path:
    """Write the report of the latest sweep of ``experiment`` (default: the latest sweep in the
    store) into ``out`` (default ``itl_runs/report/<experiment>``); returns the HTML page's path."""
    from itl_ray import plots, report_page
    from itl_ray.tracking import Reader

    started = time.perf_counter()
    if resamples < 0:
        raise UserError(f"--resamples must be 0 (no bootstrap) or more, got {resamples}")
    store = Reader()
    sweep = store.latest_sweep(experiment)
    name = store.experiment_name(sweep.info.experiment_id)
    out = Path(out) if out else DEFAULT_OUT / name
    runs = store.runs_frame(name, sweep.info.run_id)
    plan = store.plan(sweep.info.run_id)
    trials = trial_table(runs, default_experiment=study.as_experiment_name(name))
    if trials.empty:
        raise UserError(f"the latest sweep of {name!r} (run {sweep.info.run_id}) has no trial runs yet; "
                        "wait for its first trial or run `itl-ray sweep SPEC`")
    log(f"report of {name!r}: sweep run {sweep.info.run_id} ({sweep.info.status}), {len(trials)} trial runs"
        + (f" of {len(plan)} planned" if plan is not None else "") + f", store {store.uri}")
    declared = [n for n in sweep.data.params.get("experiments", "").split(",") if n]  # the spec's order
    names = list(dict.fromkeys(
        declared + [n for trial in (plan or []) for n in trial["experiments"]]
        + [n for ns in trials["experiments"] for n in ns]))
    sweep_line = _sweep_line(name, sweep, trials, plan)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="itl-report-") as scratch:
        scores = None
        if resamples:
            scores = TrialResamples(store, resamples, Path(scratch))
            scores.prepare(trials)
        sections = []
        for experiment_name in names:
            done = section(study.experiment(experiment_name), trials, planned_seeds(plan), scores)
            done.figure = plots.experiment_figure(done, out / f"{experiment_name}.png")
            sections.append(done)
            write_atomically(out / f"{experiment_name}.md", markdown(done, sweep_line) + "\n")
            write_atomically(out / f"{experiment_name}.csv", done.numbers.to_csv(index=False))
            write_atomically(out / f"{experiment_name}_comparisons.csv", comparisons_csv(done.comparisons).to_csv(index=False))
            log(f"  {experiment_name}: {len(done.points)} points, {len(done.comparisons)} comparisons")
    trials_out = trials.assign(experiments=trials["experiments"].map(",".join))
    write_atomically(out / "trials.csv", trials_out.to_csv(index=False))
    page = out / "report.html"
    write_atomically(page, report_page.html(name, sweep_line, sections, store.uri, sweep.info.run_id))
    for done in sections:
        log("")
        log(f"{done.experiment.title} ({done.experiment.name}):")
        log(tables.to_text(done.table))
    if log_to_mlflow:
        store.log_report(sweep.info.run_id, out)
        log(f"\nlogged on the parent run {sweep.info.run_id} as artifacts under report/")
    log(f"report in {time.perf_counter() - started:.1f} s: {page.resolve()}")
    return page


def _sweep_line(name: str, sweep, trials: pd.DataFrame, plan: list[dict] | None) -> str:
    finished = int((trials["status"] == "FINISHED").sum())
    planned = len(plan) if plan is not None else None
    state = "finished" if sweep.info.status == "FINISHED" else f"{sweep.info.status.lower()} (not finished)"
    partial = (planned is not None and finished < planned) or sweep.info.status != "FINISHED"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(sweep.info.start_time / 1000))
    counts = f"{finished} of {planned} planned trials finished" if planned is not None else f"{finished} trials finished"
    return (f"Sweep {name!r}, parent run {sweep.info.run_id}, started {when}, {state}: {counts}"
            + (" — PARTIAL: results below are incomplete." if partial else "."))


def main(argv: list[str] | None = None) -> int:
    """``python analysis/report.py``: the same as ``itl-ray report``."""
    from itl_ray.cli import main as cli_main

    return cli_main(["report", *(argv if argv is not None else __import__("sys").argv[1:])])
