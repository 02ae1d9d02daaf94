"""Tables for people: a pandas DataFrame as console text or as Markdown, one way for every table
the project prints or writes (the sweep's results, the dry run, the report).

Cells are shown as they are; ``None``, NaN and ``pd.NA`` show as ``missing`` (a missing result is never
shown as 0). Floats get ``digits`` decimals; keep counts in an integer column (pandas' ``Int64``
where some are missing) so they print without decimals. The rendering itself is tabulate's (pandas'
``DataFrame.to_markdown``): ``simple`` for the console (header underlined with dashes), GitHub's
pipe tables for Markdown.
"""

from __future__ import annotations

import math

import pandas as pd

MISSING = "missing"


def cell(value, digits: int = 1) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _as_text(frame: pd.DataFrame, digits: int) -> pd.DataFrame:
    """Every cell as its final string, so tabulate neither realigns nor reformats numbers."""
    return pd.DataFrame({column: [cell(value, digits) for value in frame[column].tolist()]
                         for column in frame.columns}, columns=list(frame.columns))


def to_text(frame: pd.DataFrame, digits: int = 1) -> str:
    """A console table: the header, a line of dashes, one line per row, columns left-aligned."""
    if frame.empty:
        return "(no rows)"
    return _as_text(frame, digits).to_markdown(index=False, tablefmt="simple", stralign="left",
                                               disable_numparse=True)


def to_markdown(frame: pd.DataFrame, digits: int = 1) -> str:
    """A GitHub Markdown pipe table (``|`` inside cells escaped)."""
    if frame.empty:
        return "(no rows)"
    text = _as_text(frame, digits).map(lambda cell: cell.replace("|", "\\|"))
    return text.to_markdown(index=False, tablefmt="github", stralign="left", disable_numparse=True)
