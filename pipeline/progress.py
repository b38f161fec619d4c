"""Progress bars (tqdm) for every step that can last more than a few seconds: demo generation,
decoding the sample, feature extraction, scoring and predicting.

At a terminal a bar redraws in place twice a second. In a non-interactive log (a file, a pipe,
CI, a stage's captured output) each bar is **one line**: tqdm separates redraws with carriage
returns, not newlines; it first draws after :data:`LOG_INTERVAL` seconds and then at most that
often, so a log is never flooded; and it always closes with the final count, rate and elapsed
time, also for work shorter than that interval.
"""

from __future__ import annotations

import sys
from typing import IO

from tqdm import tqdm

INTERACTIVE_INTERVAL = 0.5  # seconds between redraws at a terminal
LOG_INTERVAL = 30.0  # seconds before the first and between later redraws in a log


class _Bar(tqdm):
    """tqdm that, in a log, writes its final state even when it never drew before."""

    def close(self) -> None:
        if not getattr(self, "disable", True) and hasattr(self, "last_print_t"):
            # tqdm skips the final draw of a bar that never drew within ``delay``.
            self.last_print_t = max(self.last_print_t, self.start_t + self.delay)
        super().close()


def is_interactive(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(total: int, desc: str, unit: str = "img", file: IO[str] | None = None,
             disable: bool = False) -> tqdm:
    """A progress bar over ``total`` items (use as a context manager, ``update(n)``);
    ``disable``: no output (e.g. every rank but the first of a distributed run)."""
    stream = file if file is not None else sys.stderr
    if is_interactive(stream):
        return _Bar(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                    mininterval=INTERACTIVE_INTERVAL, disable=disable)
    return _Bar(total=total, desc=desc, unit=unit, file=stream, ascii=True, ncols=100,
                mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, delay=LOG_INTERVAL,
                disable=disable)
