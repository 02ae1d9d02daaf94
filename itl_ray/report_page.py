"""The report as one self-contained HTML page: figures embedded as PNG data, no outside files,
readable without the spec or the study at hand (each section says what it asks and how to read it)."""

from __future__ import annotations

import base64
import html as escape
import time

from itl_ray import report as report_module
from itl_ray import tables

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1320px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 2.2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #d4d4d4; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } tr:nth-child(even) td { background: #fafafa; }
td.higher { color: #0a6b2f; font-weight: 600; } td.lower { color: #a11d1d; font-weight: 600; }
img { max-width: 100%; border: 1px solid #e2e2e2; }
.meta { color: #555; font-size: 0.9em; } .question { font-size: 1.05em; font-style: italic; }
.partial { background: #fff3cd; padding: 0.4em 0.7em; border-left: 4px solid #e0a800; }
.notes li, .claims li { font-size: 0.9em; } code { background: #f3f3f3; padding: 0 3px; }
"""

HOW_TO_READ = """
<ul>
<li><b>Tables</b>: one row per point of the experiment (its pretraining settings); each metric in percent as
mean ± standard deviation over seeds, with n, the number of seeds (runs) that have it ("n=2 of 3": a planned
seed has not finished). "missing": no run has that metric, never a zero. Published values from the study
(Huh, Agrawal, Efros 2016) stand in their own column where the study reports one at that point.</li>
<li><b>Figures</b>: mean over seeds with error bars of ± 1 standard deviation; the dashed line and grey band
are the random-initialisation control (the same network without pretraining); stars labelled "published" are
the study's own figures.</li>
<li><b>Comparisons</b>: the differences the study asks about, A − B in percentage points, with two 95%
confidence intervals: over <i>test images</i> (paired bootstrap: the test set resampled with replacement, the
same resamples for A and B, both metrics recomputed from the trials' per-image scores) and over <i>seeds</i>
(Student's t on the per-seed differences). "A higher" / "A lower" only where the interval excludes 0;
"no significant difference" where it covers 0; "no interval" with the reason where it cannot be computed.</li>
<li>Metrics: PASCAL-DET = VOC 2007 detection mAP (11-point AP, Fast R-CNN); PASCAL-ACT-CLS = VOC 2012 action
mAP; SUN-CLS = SUN397 mean per-class accuracy; pretrain_top1 = ImageNet validation top-1 on the trial's own
label set (not comparable across label sets); induction = nearest-neighbour accuracy of penultimate features
on the fine classes.</li>
</ul>
"""


def _table(frame, digits: int = 1, verdicts: bool = False) -> str:
    if frame.empty:
        return "<p class='meta'>(no rows)</p>"
    shown = frame.copy()
    for column in shown.columns:
        shown[column] = [tables.cell(value, digits) for value in shown[column].tolist()]
    text = shown.to_html(index=False, escape=True, border=0)
    if verdicts:
        text = text.replace("<td>A higher</td>", "<td class='higher'>A higher</td>")
        text = text.replace("<td>A lower</td>", "<td class='lower'>A lower</td>")
    return text


def _figure(section) -> str:
    if section.figure is None or not section.figure.is_file():
        return "<p class='meta'>(no figure: no points)</p>"
    data = base64.b64encode(section.figure.read_bytes()).decode()
    alt = escape.escape(f"{section.experiment.title}: each metric of the experiment's points")
    return f"<img alt='{alt}' src='data:image/png;base64,{data}'>"


def html(name: str, sweep_line: str, sections: list, uri: str, parent_run_id: str) -> str:
    """The page for the report of sweep ``name``."""
    e = escape.escape
    partial = "PARTIAL" in sweep_line
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>itl_ray report: {e(name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>What makes ImageNet good for transfer learning? Sweep <code>{e(name)}</code></h1>",
        f"<p class='{'partial' if partial else 'meta'}'>{e(sweep_line)}</p>",
        f"<p class='meta'>MLflow store <code>{e(uri)}</code>; written {time.strftime('%Y-%m-%d %H:%M')}. "
        f"Compare runs: <code>mlflow ui --backend-store-uri '{e(uri)}'</code> (parent run {e(parent_run_id)}).</p>",
        "<h3>How to read this page</h3>", HOW_TO_READ,
        "<h3>Experiments</h3><ul>",
        *[f"<li><a href='#{e(s.experiment.name)}'>{e(s.experiment.title)}</a>: {e(s.experiment.question)}</li>"
          for s in sections],
        "</ul>",
    ]
    for section in sections:
        experiment = section.experiment
        parts += [f"<h2 id='{e(experiment.name)}'>{e(experiment.title)} <span class='meta'>({e(experiment.name)})</span></h2>",
                  f"<p class='question'>{e(experiment.question)}</p>"]
        if experiment.claims:
            parts += ["<p>What the study reports:</p><ul class='claims'>",
                      *[f"<li>{e(claim)}</li>" for claim in experiment.claims], "</ul>"]
        parts += [_figure(section), "<h3>Results (mean ± std over seeds, n)</h3>", _table(section.table)]
        if not section.comparisons.empty:
            parts += ["<h3>Comparisons: A − B with 95% confidence intervals</h3>",
                      _table(report_module.comparisons_for_files(section.comparisons), digits=2, verdicts=True)]
        if section.notes:
            parts += ["<ul class='notes'>", *[f"<li>{e(note)}</li>" for note in section.notes], "</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)
