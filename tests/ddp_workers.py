"""What the DDP tests run as ranks under torchrun: ``python -m ddp_workers <name> <folder>``
(``tests/`` and the repository on ``PYTHONPATH``). Each rank joins the group as the train
stage does (``distributed.joined``) and runs one of the functions below; a user error exits 2
with its message, as a stage does."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from pipeline import distributed, signals
from pipeline.compute import resolve_compute
from pipeline.config import ComputeConfig, params_from_dict
from pipeline.errors import USER_ERRORS, PipelineError


def _note_pid(group, out: str) -> None:
    Path(out, f"pid{group.rank}").write_text(str(os.getpid()))


def collectives(group, out: str) -> None:
    """Rank r contributes r + 1 rows of value r (rank 0 also a [0, 0] array), and 1 to a sum."""
    import torch

    rows = np.full((group.rank + 1, 3), group.rank, np.float32)
    gathered = group.all_gather_rows(rows)
    empty = group.all_gather_rows(np.zeros((0, 0), np.float32) if group.rank == 0 else rows)
    np.savez(Path(out, f"rank{group.rank}.npz"), *gathered,
             sums=np.array(group.sum([group.rank, 1.5])),
             empty_rows=np.array([len(e) for e in empty]),
             threads=np.array(torch.get_num_threads()),
             world=np.array(group.world_size))


def kill_rank_one(group, out: str) -> None:
    """Rank 1 is SIGKILLed (once rank 0 has noted its pid) while rank 0 waits for it in a
    collective."""
    _note_pid(group, out)
    if group.rank == 1:
        deadline = time.monotonic() + 60
        while not Path(out, "pid0").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), 9)
    group.barrier()


def user_error_on_rank_one(group, out: str) -> None:
    _note_pid(group, out)
    if group.rank == 1:
        raise PipelineError("rank 1 found a stale manifest (a message for people)")
    group.barrier()


def train(cfg: dict) -> None:
    """The train job from a JSON description; rank 0 writes what it returned."""
    from pipeline.handoffs import Manifest
    from pipeline.jobs.train import TrainData, TrainRun, train_and_log
    from pipeline.runs.tracking import RunSpec

    p = params_from_dict(cfg["params"])
    data = TrainData(Path(cfg["root"]), tuple(cfg["classes"]), Manifest.read(cfg["train"]),
                     Manifest.read(cfg["val"]))
    spec = RunSpec(cfg["experiment"], cfg["experiment"], {}, p.flat())
    out = train_and_log(TrainRun.from_params(p, data, Path(cfg["cache"]), spec=spec))
    if out is not None:
        Path(cfg["result"]).write_text(json.dumps(
            {"metrics": out.metrics, "run_id": out.run.run_id, "model_uri": out.run.model_uri}))


def main(name: str, arg: str) -> None:
    signals.install()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if name == "train":
            train(json.loads(Path(arg).read_text()))
            return
        with distributed.joined(resolve_compute(ComputeConfig(device="cpu"))) as group:
            globals()[name](group, arg)
    except USER_ERRORS as exc:
        logging.getLogger("ddp_workers").error("%s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main(*sys.argv[1:3])
