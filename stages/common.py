"""The shared stage runner: logging, params, threads, signals, and user errors turned into
messages."""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable

from pipeline import signals
from pipeline.config import Params, load_params
from pipeline.errors import USER_ERRORS

log = logging.getLogger("stages")


def run_stage(main: Callable[[Params], None], *, torch_threads: bool = False) -> None:
    """Set up logging, load params.yaml, run ``main``; a user error exits 2 with its message.

    SIGTERM and Ctrl-C stop the stage at once (an open MLflow run ends as KILLED) with exit
    code 128 + the signal. ``torch_threads``: use every CPU core for torch (its default may be
    fewer); only the stages that compute import torch.
    """
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
    # Tearing down torch, torchvision and MLflow's objects at exit costs ~1 s per stage
    # (measured); objects moved to the permanent generation skip the final collection.
    gc.freeze()
