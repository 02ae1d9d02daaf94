"""Fault points: inert unless armed; armed, a held point waits until the test releases it."""

from __future__ import annotations

import subprocess
import sys
import time

from itl_ray import barrier

WAITER = "from itl_ray import barrier; barrier.reach('t1.detection-done'); print('passed', flush=True)"


def test_unarmed_points_do_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(barrier.ENVIRONMENT, raising=False)
    barrier.reach("t1.detection-done", log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_an_armed_point_is_recorded_and_passed_when_not_held(tmp_path, monkeypatch):
    monkeypatch.setenv(barrier.ENVIRONMENT, str(tmp_path))
    assert barrier.reached(tmp_path, "t1.pretrain-epoch-1") is None
    barrier.reach("t1.pretrain-epoch-1", log=lambda line: None)
    assert barrier.reached(tmp_path, "t1.pretrain-epoch-1") is not None


def test_a_held_point_waits_for_its_release(tmp_path):
    barrier.hold(tmp_path, "t1.detection-done")
    env = {barrier.ENVIRONMENT: str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    waiter = subprocess.Popen([sys.executable, "-c", WAITER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        while barrier.reached(tmp_path, "t1.detection-done") != waiter.pid:
            assert waiter.poll() is None, "the process passed a held point"
            time.sleep(0.05)
        assert waiter.poll() is None  # it is there, and stays until released
        barrier.release(tmp_path, "t1.detection-done")
        out, _ = waiter.communicate(timeout=60)
        assert waiter.returncode == 0 and out.splitlines()[-1] == "passed"
    finally:
        if waiter.poll() is None:
            waiter.kill()
