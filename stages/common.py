"""The shared stage runner: logging, params, threads, signals, and user errors turned into
messages."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable

from pipeline import signals
from pipeline.config import Params, load_params
from pipeline.errors import USER_ERRORS

log = logging.getLogger("stages")

TIMINGS_ENV = "FOOD101_TIMINGS"  # a file: each stage appends its start-up and run seconds


def _seconds_since_start() -> float | None:
    """Seconds since this process started (Linux: /proc), None where that is unknown: the
    interpreter's start-up and imports, when called before the stage's work."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _record_timing(startup: float | None, t0: float) -> None:
    """With ``FOOD101_TIMINGS`` set (``make bench`` sets it), append this stage's start-up
    and run seconds to that file as one JSON line."""
    path = os.environ.get(TIMINGS_ENV)
    if not path:
        return
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    stage = (main_spec.name if main_spec else sys.argv[0]).rsplit(".", 1)[-1]
    with open(path, "a") as fh:
        fh.write(json.dumps({"stage": stage, "startup_s": startup,
                             "run_s": round(time.perf_counter() - t0, 3)}) + "\n")


def run_stage(main: Callable[[Params], None], *, torch_threads: bool = False) -> None:
    """Set up logging, load params.yaml, run ``main``; a user error exits 2 with its message.

    SIGTERM and Ctrl-C stop the stage at once (an open MLflow run ends as KILLED) with exit
    code 128 + the signal. ``torch_threads``: use every CPU core for torch (its default may be
    fewer); only the stages that compute import torch.
    """
    startup, t0 = _seconds_since_start(), time.perf_counter()
    signals.install()
    logging.basicConfig(
        level=os.environ.get("FOOD101_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        params = load_params("params.yaml")
        if torch_threads:
            import torch

            torch.set_num_threads(max(1, os.cpu_count() or 1))
        main(params)
    except USER_ERRORS as exc:
        log.error("%s", exc)
        sys.exit(2)
    except KeyboardInterrupt as exc:  # SIGTERM (signals.Terminated) or Ctrl-C
        log.error("stopped by %s", "SIGTERM" if isinstance(exc, signals.Terminated) else
                  "Ctrl-C")
        sys.exit(signals.exit_code(exc))
    _record_timing(startup, t0)
    # Tearing down torch, torchvision and MLflow's objects at exit costs ~1 s per stage
    # (measured); objects moved to the permanent generation skip the final collection.
    gc.freeze()
