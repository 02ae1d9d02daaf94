"""The progress line: rate and time left from a controlled clock; terminals rewrite one line,
logs get a line every `every` seconds and one at the end."""

import io

from itl_ray.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_rate_and_time_left_in_a_log():
    clock, stream = Clock(), io.StringIO()
    progress = Progress("prepare voc2007", total=1000, unit="images", stream=stream, every=30, clock=clock)
    for _ in range(10):  # 100 images in 10 s: not yet time for a line
        clock.now += 1
        progress.update(10)
    assert stream.getvalue() == ""
    clock.now = 40.0
    progress.update(300)  # 400 images in 40 s: 10/s, 600 left = 1 minute
    assert stream.getvalue() == "prepare voc2007: 400/1,000 images, 10.0 images/s, 1m00s left\n"
    clock.now = 100.0
    progress.update(600)
    progress.close()
    progress.close()  # once only
    assert stream.getvalue().splitlines()[-1] == "prepare voc2007: 1,000/1,000 images, 10.0 images/s, 1m40s"
    assert len(stream.getvalue().splitlines()) == 3


def test_terminal_rewrites_one_line_and_log_function_gets_lines():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    clock, tty = Clock(), Tty()
    progress = Progress("epoch 1", total=None, unit="it", stream=tty, clock=clock)
    clock.now = 1.0
    progress.update(5)
    progress.close()
    assert tty.getvalue() == "\repoch 1: 5 it, 5.0 it/s, 1s\repoch 1: 5 it, 5.0 it/s, 1s\n"

    lines = []
    logged = Progress("features", total=4, unit="images", log=lines.append, every=0, clock=clock)
    clock.now = 3.0
    logged.update(4)
    assert lines == ["features: 4/4 images, 2.0 images/s, 2s"]
