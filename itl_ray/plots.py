"""The report's figures (matplotlib, PNG): one per experiment, one panel per metric.

Every panel says what it shows without the surrounding text: a title (the task), axis labels with
units, points as mean over seeds with error bars of one standard deviation (n in the legend), the
random-initialisation control as a dashed horizontal line with its standard deviation as a band,
and the study's published figures as a separate series labelled "published". Layouts
(``study.Experiment.layout``): a metric against images per class or number of classes (log
scale), along a fixed budget (one line per budget), or as bars for named label sets.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from itl_ray import study
from itl_ray.files import atomic_path

PUBLISHED_LABEL = "published (Huh et al. 2016)"
CONTROL_LABEL = "random init (no pretraining)"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _x_axis(layout: str, points: pd.DataFrame) -> tuple[str, str]:
    """(column, axis label) of the x axis for a layout."""
    if layout == "images_per_class":
        return "images_per_class", "images per class (log scale)"
    if layout in ("classes", "induction"):
        return "num_classes", "pretraining classes after merging (log scale)"
    if layout == "budget":
        return "source_classes", "classes (log scale); images per class = budget / classes"
    varying = points["images_per_class"].nunique() > 1
    return ("images_per_class", "images per class (log scale)") if varying else (
        "pretrain_images", "pretraining images (log scale)")


def _series(layout: str, points: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The lines of a panel: (legend label, its points sorted along x)."""
    x, _ = _x_axis(layout, points)
    if layout in ("classes", "induction"):
        family = points["label_set"].map(lambda name: "up_down" if str(name).startswith("up_down")
                                         else "down_up" if str(name).startswith("down_up") else str(name))
        groups = []
        fine = points[points["label_set"] == "fine"]
        for key, label in (("down_up", "bottom-up merges (down_up_N) and fine"),
                           ("up_down", "top-down merges (up_down_N) and fine")):
            members = points[family == key]
            if len(members):
                groups.append((label, pd.concat([members, fine]).sort_values(x)))
        others = points[~family.isin(["down_up", "up_down"])]
        if len(others) and not groups:
            groups.append(("label sets", others.sort_values(x)))
        elif len(others[others["label_set"] != "fine"]):
            groups.append(("other label sets", others[others["label_set"] != "fine"].sort_values(x)))
        return groups
    if layout == "budget":
        budget = points["source_classes"] * points["images_per_class"]
        return [(f"budget {int(value):,} images", points[budget == value].sort_values(x))
                for value in sorted(budget.dropna().unique(), reverse=True)]
    if layout == "generic" and x == "images_per_class" and points["num_classes"].nunique() > 1:
        return [(f"{int(value)} classes", points[points["num_classes"] == value].sort_values(x))
                for value in sorted(points["num_classes"].dropna().unique(), reverse=True)]
    return [("this sweep (mean ± std over seeds)", points.sort_values(x))]


def _spaced(values: list[float], gap: float = 0.13) -> list[float]:
    """Tick positions on a log axis at least ``gap`` decades apart (labels would overlap), the
    largest always kept."""
    kept: list[float] = []
    for value in sorted(values, reverse=True):
        if value > 0 and (not kept or math.log10(kept[-1] / value) >= gap):
            kept.append(value)
    return sorted(kept)


def _seeds_text(points: pd.DataFrame, metric: str) -> str:
    counts = sorted(set(int(n) for n in points[f"{metric}_n"] if n > 0))
    if not counts:
        return "n=0"
    return f"n={counts[0]}" if len(counts) == 1 else f"n={counts[0]}-{counts[-1]}"


def _panel(axis, section, metric: str) -> None:
    experiment, points = section.experiment, section.points
    layout = experiment.layout
    title, unit = study.METRICS[metric]
    control = points[points["images_per_class"] == 0]
    pretrained = points[(points["images_per_class"] != 0) & (points[f"{metric}_n"] > 0)]
    published = [(value, point_id) for value in section.published if value.metric == metric
                 for point_id in points.loc[[study.matches(row.to_dict(), value.point) for _, row in points.iterrows()],
                                            "point_id"]]
    axis.set_title(title, fontsize=11)
    axis.set_ylabel(unit)
    if pretrained.empty and (control[f"{metric}_n"] == 0).all():
        axis.text(0.5, 0.5, f"no run has {metric}:\nthese trials did not measure it", ha="center", va="center",
                  transform=axis.transAxes, color="0.4")
        axis.set_xticks([])
        axis.set_yticks([])
        return
    if layout == "categories":
        labels = list(pretrained["label"])
        positions = np.arange(len(labels))
        axis.errorbar(positions, pretrained[f"{metric}_mean"], yerr=pretrained[f"{metric}_std"].fillna(0),
                      marker="o", markersize=7, linestyle="none", capsize=5, color="C0",
                      label=f"this sweep (mean ± std over seeds, {_seeds_text(pretrained, metric)})")
        axis.set_xticks(positions, [label.replace(" (", "\n").rstrip(")") for label in labels], fontsize=7.5)
        axis.set_xlim(-0.6, len(labels) - 0.4)
        axis.set_xlabel("pretraining label set")
        for value, point_id in published:
            where = list(pretrained["point_id"]).index(point_id) if point_id in list(pretrained["point_id"]) else None
            if where is not None:
                axis.plot([where], [value.value], marker="*", markersize=14, color="C3", linestyle="none",
                          label=PUBLISHED_LABEL)
    else:
        x, label = _x_axis(layout, points)
        series = _series(layout, pretrained)
        for index, (name, members) in enumerate(series):
            members = members.dropna(subset=[x])
            # Series that share points (fine in both merge orders) are drawn a little apart.
            shift = 1 + 0.025 * (index - (len(series) - 1) / 2)
            axis.errorbar(members[x] * shift, members[f"{metric}_mean"], yerr=members[f"{metric}_std"].fillna(0),
                          marker="o", capsize=4, color=f"C{index}",
                          label=f"{name} ({_seeds_text(members, metric)})")
            if layout == "budget":  # name each point; one series above its points, the next below
                for _, row in members.iterrows():
                    axis.annotate(f"{int(row['source_classes'])}x{int(row['images_per_class'])}",
                                  (row[x], row[f"{metric}_mean"]), textcoords="offset points", fontsize=7,
                                  xytext=(0, 7 if index % 2 == 0 else -13), ha="center", color=f"C{index}")
        if published:
            spots = sorted((float(points.set_index("point_id").loc[point_id, x]), value.value)
                           for value, point_id in published)
            axis.plot([s[0] for s in spots], [s[1] for s in spots], marker="*", markersize=13, linestyle=":",
                      color="C3", label=PUBLISHED_LABEL)
        axis.set_xscale("log")
        axis.margins(x=0.08)
        ticks = _spaced(sorted(set(pretrained[x].dropna()) - {0}))
        if ticks:
            axis.set_xticks(ticks, [f"{int(v):,}" for v in ticks], fontsize=8)
            axis.minorticks_off()
        axis.set_xlabel(label)
    if not control.empty and control[f"{metric}_n"].iloc[0] > 0:
        row = control.iloc[0]
        mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
        axis.axhline(mean, color="0.35", linestyle="--", linewidth=1.2,
                     label=f"{CONTROL_LABEL} (n={int(row[f'{metric}_n'])})")
        if not math.isnan(std):
            axis.axhspan(mean - std, mean + std, color="0.6", alpha=0.18, linewidth=0)
    axis.grid(True, alpha=0.3)


def experiment_figure(section, path: Path) -> Path | None:
    """The experiment's figure as a PNG at ``path`` (written atomically); None without points."""
    if section.points.empty:
        return None
    plt = _pyplot()
    experiment = section.experiment
    metrics = experiment.metrics
    figure, axes = plt.subplots(1, len(metrics), figsize=(5.0 * len(metrics), 4.8), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        _panel(axis, section, metric)
    handles: dict[str, object] = {}
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        figure.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=min(3, len(handles)),
                      fontsize=9, frameon=False, bbox_to_anchor=(0.5, 0.035))
    width = 5.0 * len(metrics)
    figure.suptitle(textwrap.fill(f"{experiment.title}: {experiment.question}", int(width * 14)), fontsize=12)
    footer = "Points: mean over seeds; error bars and grey band: ± 1 standard deviation over seeds (n = seeds)."
    drawn = {value.metric for value in section.published}
    if experiment.claims and not drawn:
        footer += " Published (full ImageNet, not at these points): " + " ".join(experiment.claims)
    figure.text(0.01, 0.005, textwrap.fill(footer, int(width * 26)), fontsize=7.5, color="0.3", va="bottom")
    rows = max(1, math.ceil(len(handles) / 3))
    figure.subplots_adjust(left=0.06 if len(metrics) > 2 else 0.09, right=0.98, wspace=0.25, top=0.84,
                           bottom=0.19 + 0.05 * rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return path
