"""Progress bars: redrawn in place at a terminal, one line each in a log."""

import io
import time

from pipeline import progress as progress_module
from pipeline.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_log_a_bar_is_one_line_with_its_final_state():
    log = io.StringIO()
    with progress(5000, "features", file=log) as bar:
        for _ in range(500):
            bar.update(10)
    text = log.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.count("\r") == 1  # drawn once, at the end: nothing in between floods a log
    assert "features: 100%" in text and "5000/5000" in text and "img/s" in text


def test_in_a_log_a_long_step_redraws_on_the_same_line_at_most_every_interval(monkeypatch):
    monkeypatch.setattr(progress_module, "LOG_INTERVAL", 0.05)
    log = io.StringIO()
    with progress(4, "demo images", file=log) as bar:
        for _ in range(4):
            time.sleep(0.06)
            bar.update(1)
    text = log.getvalue()
    assert text.count("\n") == 1
    assert 2 <= text.count("\r") <= 5  # a few redraws, each after the interval, one line
    assert "4/4" in text.rsplit("\r", 1)[1]


def test_an_interrupted_step_still_closes_its_line():
    log = io.StringIO()
    try:
        with progress(100, "predict", file=log) as bar:
            bar.update(7)
            raise KeyError("stop")
    except KeyError:
        pass
    assert log.getvalue().endswith("\n") and "7/100" in log.getvalue()


def test_at_a_terminal_the_bar_redraws_often():
    term = Terminal()
    bar = progress(10, "x", file=term)
    assert bar.mininterval == progress_module.INTERACTIVE_INTERVAL
    bar.close()
    assert "10" in term.getvalue()
