"""Stopping a stage on purpose: SIGTERM and Ctrl-C become one exception the run plumbing
understands (the MLflow run ends as KILLED), and short critical sections (a registry decision
and its record) finish before a stop takes effect.

SIGKILL cannot be caught: a run left RUNNING by it is reaped by the next run
(``tracking.reap_killed_runs``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (a KeyboardInterrupt, so both stop the same way)."""


_deferred = 0
_pending: int | None = None


def _handle(signum, frame) -> None:
    global _pending
    if _deferred:
        _pending = signum  # raised when the critical section ends
        return
    _raise(signum)


def _raise(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated("SIGTERM")
    raise KeyboardInterrupt


def install() -> None:
    """Route SIGTERM and SIGINT through :func:`deferred` (main thread only, as Python's
    signal handlers are)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handle)
        signal.signal(signal.SIGINT, _handle)


def exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal number."""
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A stop requested inside this block takes effect when it ends (after its writes)."""
    global _deferred, _pending
    _deferred += 1
    try:
        yield
    finally:
        _deferred -= 1
        if not _deferred and _pending is not None:
            signum, _pending = _pending, None
            _raise(signum)
