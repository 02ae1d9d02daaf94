"""What a sweep prints on the driver's console: its progress line, and the settings that keep
Ray's own output to the trials' lines. Plain Python (Ray and Tune are adapted in ``sweep.py``)."""

from __future__ import annotations

import os
import sys
import time

from itl_ray.progress import duration


def say(line: str) -> None:
    """Print a line of the sweep's own output, flushed so that a pipe or log shows it at once.
    (A module function: Tune pickles its callbacks, and ``print`` itself does not pickle once Ray
    has started.)"""
    print(line, flush=True)


class SweepProgress:
    """The sweep's progress line: trials done, running, pending (and failed), time elapsed and an
    estimate of the time left, printed through ``log`` when a trial starts or ends, and at most
    every ``every`` seconds while trials report.

    The estimate: finished trials' mean duration m; each running trial needs about m minus its
    time so far, each pending one m, spread over as many trials as have run at once. Trials run
    longest first, so it errs long. ``clock``: for tests, a function returning seconds."""

    def __init__(self, name: str, total: int, log=say, every: float = 300.0, clock=time.monotonic):
        self.name, self.total, self.log, self.every, self.clock = name, total, log, every, clock
        self.began = clock()
        self.last_shown = self.began
        self.started: dict[str, float] = {}  # trial id -> when it started
        self.durations: dict[str, float] = {}  # finished trials' seconds
        self.failed: set[str] = set()
        self.most_at_once = 1

    def running(self) -> list[str]:
        return [tid for tid in self.started if tid not in self.durations and tid not in self.failed]

    def line(self) -> str:
        """``sweep NAME: 2/5 trials done, 2 running, 1 pending; 4m10s elapsed, ~6m20s left``."""
        now = self.clock()
        running = self.running()
        done = len(self.durations)
        pending = self.total - done - len(self.failed) - len(running)
        text = f"sweep {self.name}: {done}/{self.total} trials done, {len(running)} running, {pending} pending"
        if self.failed:
            text += f", {len(self.failed)} failed"
        text += f"; {duration(now - self.began)} elapsed"
        if running or pending:
            if self.durations:
                mean = sum(self.durations.values()) / len(self.durations)
                work = sum(max(0.0, mean - (now - self.started[tid])) for tid in running) + pending * mean
                text += f", ~{duration(work / self.most_at_once)} left"
            else:
                text += ", time left known after the first trial"
        return text

    def show(self) -> None:
        self.last_shown = self.clock()
        self.log(self.line())

    def start(self, tid: str) -> None:
        """A trial started (again, after a retry: its start stays the first one)."""
        self.started.setdefault(tid, self.clock())
        self.failed.discard(tid)
        self.most_at_once = max(self.most_at_once, len(self.running()))
        self.show()

    def end(self, tid: str, failed: bool = False) -> None:
        """A trial ended: finished, or failed for good."""
        start = self.started.setdefault(tid, self.clock())
        if failed:
            self.failed.add(tid)
        else:
            self.durations[tid] = self.clock() - start
        self.show()

    def reported(self) -> None:
        """A trial reported: show the line when ``every`` seconds have passed since the last."""
        if self.clock() - self.last_shown >= self.every:
            self.show()


def quiet_ray(stdout=None) -> None:
    """Set, unless already set, the environment variables that keep Ray's console output to the
    trials' own lines; call before ``import ray`` (Ray reads most of them on import):
    - ``RAY_DEDUP_LOGS=0``: every line of every trial (Ray folds lines that look alike across
      processes into "[repeated 5x across cluster]", which drops epoch lines);
    - ``RAY_DISABLE_WORKER_LOG_PREFIX=1``: no "(_trainable pid=...)" before each line (each
      trial's lines start with its name);
    - ``RAY_COLOR_PREFIX=0`` when ``stdout`` (default ``sys.stdout``) is not a terminal: no ANSI
      colour codes in logs and pipes;
    - ``RAY_AIR_NEW_OUTPUT=0`` and ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``: Tune prints no
      experiment banner or TensorBoard hint and writes no per-trial result files (JSON, CSV,
      TensorBoard events); the sweep's progress line and MLflow take their place."""
    stdout = stdout or sys.stdout
    settings = {"RAY_DEDUP_LOGS": "0", "RAY_DISABLE_WORKER_LOG_PREFIX": "1", "RAY_AIR_NEW_OUTPUT": "0",
                "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}
    if not (hasattr(stdout, "isatty") and stdout.isatty()):
        settings["RAY_COLOR_PREFIX"] = "0"
    for key, value in settings.items():
        os.environ.setdefault(key, value)


def quiet_lost_sigterm() -> None:
    """In a Ray worker (a trial's process): print nothing for a SIGTERM that Python could not
    deliver, where Python would print a traceback.

    Ray's workers handle SIGTERM by raising ``SystemExit`` (``ray/_private/worker.py``,
    ``Worker.main_loop``). Python runs a signal handler wherever the main thread is, and when that is
    inside a weakref callback or a ``__del__`` (garbage collection), the ``SystemExit`` cannot
    propagate: Python ignores it and prints "Exception ignored in: ... SystemExit: 1" with its
    traceback. On a loaded machine this happens as the raylet ends a finished trial's worker. The
    worker still ends: the raylet sends SIGKILL after ``kill_worker_timeout_milliseconds``
    (``NodeManager::KillWorker``, ``src/ray/raylet/node_manager.cc``; default 100 ms).

    This installs a ``sys.unraisablehook`` that ignores an undeliverable ``SystemExit`` as Python
    does, without the print; every other unraisable exception goes to the hook that was installed
    before, as before. Process-wide, idempotent, and safe from any thread (Tune runs a trial in a
    thread of its own)."""
    previous = sys.unraisablehook
    if getattr(previous, "quiet_lost_sigterm", False):
        return

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, SystemExit):
            previous(unraisable)

    hook.quiet_lost_sigterm = True
    sys.unraisablehook = hook
