"""Progress of long loops (an epoch, preparing a dataset, Selective Search, feature extraction):
done / total, rate and time left, on one line.

On a terminal the line is rewritten in place (at most a few times a second); when the output is
a file or a pipe (a log, Ray's captured output), a line is written only every ``every`` seconds
and at the end, so logs stay short. Imports nothing beyond the standard library, so every stage
can use it on a bare GPU machine.

    progress = Progress("detection: train", total=40000, unit="it")
    for iteration in range(40000):
        ...
        progress.update()
    progress.close()
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def duration(seconds: float) -> str:
    """``3725`` -> ``1h02m``, ``125`` -> ``2m05s``, ``9.5`` -> ``10s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """A progress line for ``total`` units of work (``total`` may be None when unknown).

    ``stream``: where the line goes (default: standard error). ``every``: seconds between lines
    when ``stream`` is not a terminal (default 30). ``log``: instead of a stream, a function that
    takes each line (for stages that print through the trial's ``log``); lines then follow the
    non-terminal rule. ``clock``: for tests, a function returning seconds."""

    def __init__(self, label: str, total: int | None, unit: str = "images", stream: TextIO | None = None,
                 every: float = 30.0, log: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.log = log
        self.terminal = log is None and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every = 0.2 if self.terminal else every
        self.clock = clock
        self.started = clock()
        self.last_shown = self.started
        self.done = 0
        self.closed = False

    def line(self) -> str:
        """The current line: ``label: done/total unit (rate unit/s, time left)``."""
        elapsed = max(1e-9, self.clock() - self.started)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done:,}"
        if self.total is not None:
            text += f"/{self.total:,}"
        text += f" {self.unit}, {rate:,.1f} {self.unit}/s"
        if self.total is not None and rate > 0 and self.done < self.total:
            text += f", {duration((self.total - self.done) / rate)} left"
        else:
            text += f", {duration(elapsed)}"
        return text

    def _show(self, final: bool = False) -> None:
        if self.log is not None:
            self.log(self.line())
        elif self.terminal:
            self.stream.write("\r" + self.line() + ("\n" if final else ""))
            self.stream.flush()
        else:
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def update(self, count: int = 1) -> None:
        """Count ``count`` more units done; show the line when it is time to."""
        self.done += count
        now = self.clock()
        if now - self.last_shown >= self.every:
            self.last_shown = now
            self._show()

    def close(self) -> None:
        """Show the final line (once)."""
        if not self.closed:
            self.closed = True
            self._show(final=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
