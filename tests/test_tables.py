from __future__ import annotations

import math

import pandas as pd

from itl_ray.sweep import results_table
from itl_ray.tables import to_markdown, to_text


def test_missing_values_are_never_zero():
    frame = pd.DataFrame({"trial": ["a", "b|c"], "map": [1.234, math.nan], "n": pd.array([3, None], dtype="Int64")})
    text = to_text(frame)
    lines = text.splitlines()
    assert lines[0].split() == ["trial", "map", "n"] and set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["a", "1.2", "3"] and lines[3].split() == ["b|c", "missing", "missing"]
    markdown = to_markdown(frame, digits=2)
    assert markdown.splitlines()[0].startswith("| trial") and "| b\\|c " in markdown and "1.23" in markdown


def test_sweep_results_table_uses_the_helper():
    rows = [{"name": "x=1", "pretrain_top1": 50.0, "voc07_det_map": 6.25}, {"name": "x=2", "error": "boom"}]
    text = results_table(rows)
    assert text.splitlines()[0].split() == ["trial", "pretrain_top1", "voc07_det_map", "voc12_act_map", "sun397_acc"]
    assert text.splitlines()[2].split() == ["x=1", "50.0", "6.2", "missing", "missing"]
    assert text.splitlines()[3].split()[1:] == ["missing"] * 4
