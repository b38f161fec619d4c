"""Progress bars: redrawn in place at a terminal, one line each in a log."""

import io

import pytest
import tqdm.std

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


class Clock:
    """The time tqdm reads, moved by the test: redraws depend on it, not on the machine."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(tqdm.std, "time", fake)  # tqdm's bars read it when they are made
    monkeypatch.setattr(tqdm.std.tqdm, "monitor_interval", 0)  # no thread on the real clock
    return fake


def test_in_a_log_a_long_step_redraws_on_the_same_line_every_interval(clock):
    """10 images, one every 10 s, LOG_INTERVAL 30 s: drawn at 30, 60 and 90 s (never before
    the first interval, never more often), then closed with the final count at 100 s."""
    assert progress_module.LOG_INTERVAL == 30.0
    log = io.StringIO()
    with progress(10, "demo images", file=log) as bar:
        for _ in range(10):
            clock.now += 10
            bar.update(1)
    text = log.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    draws = text.rstrip("\n").split("\r")[1:]
    assert [d.split("|")[-1].split()[0] for d in draws] == ["3/10", "6/10", "9/10", "10/10"]
    assert "[01:40<00:00" in draws[-1]


def test_in_a_log_a_step_shorter_than_the_interval_draws_once_at_the_end(clock):
    log = io.StringIO()
    with progress(4, "predict", file=log) as bar:
        for _ in range(4):
            clock.now += 7  # 28 s in all: under LOG_INTERVAL
            bar.update(1)
    assert log.getvalue().count("\r") == 1 and "4/4" in log.getvalue()


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
