"""Functions the DDP tests run inside launched workers. They live in an importable module (not
a test file): the launcher's spawned processes import them by name."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError


def _note_pid(group, out: str) -> None:
    Path(out, f"pid{group.rank}").write_text(str(os.getpid()))


def collectives(group, out: str) -> None:
    """Rank r contributes r + 1 rows of value r (rank 0 also a [0, 0] array), and 1 to a sum."""
    rows = np.full((group.rank + 1, 3), group.rank, np.float32)
    gathered = group.all_gather_rows(rows)
    empty = group.all_gather_rows(np.zeros((0, 0), np.float32) if group.rank == 0 else rows)
    import torch

    from pipeline.distributed import GlobalBatchNorm, GlobalDropout

    # BatchNorm over the global batch: each rank normalises its rows (r, r+2, ...) of one
    # batch with the statistics of all of them; dropout keeps its rows of the global mask
    x = torch.arange(48, dtype=torch.float32).reshape(12, 4) ** 1.5
    bn = GlobalBatchNorm(4, affine=True).train()
    with torch.no_grad():
        bn.weight.mul_(2.0)
    normed = bn(x[group.rank :: group.world_size]).detach()
    torch.manual_seed(0)
    masked = GlobalDropout(0.5, group.rank, group.world_size).train()(torch.ones(6, 8))
    np.savez(Path(out, f"rank{group.rank}.npz"), *gathered,
             normed=normed.numpy(), running_var=bn.running_var.numpy(), masked=masked.numpy(),
             sums=np.array(group.sum([group.rank, 1.5])),
             empty_rows=np.array([len(e) for e in empty]),
             threads=np.array(torch.get_num_threads()),
             world=np.array(group.world_size))


def kill_rank_one(group, out: str) -> None:
    """Rank 1 is SIGKILLed while rank 0 waits for it in a collective."""
    _note_pid(group, out)
    if group.rank == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), 9)
    group.barrier()
    time.sleep(60)


def user_error_on_rank_one(group, out: str) -> None:
    _note_pid(group, out)
    if group.rank == 1:
        raise PipelineError("rank 1 found a stale manifest (a message for people)")
    group.barrier()
    time.sleep(60)
