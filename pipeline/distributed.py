"""Several training processes, one way: PyTorch's own launcher, ``torchrun``
(``python -m torch.distributed.run``).

Why torchrun: it is what several machines use anyway (``torchrun --nnodes=M ... -m
stages.train`` on each), so one machine takes the very same path, and it already does what a
launcher must (a standalone rendezvous on a free port, one process per rank, a dead rank
stops the others, a stop signal reaches every rank). No home-made launcher.

- :func:`torchrun` starts N ranks of a command on this machine and waits for them: the train
  stage, asked for ``compute.nproc`` > 1, runs itself again under it.
- :func:`joined` is a rank's side: the process group of the ranks torchrun started
  (NCCL on GPUs, Gloo on CPUs), as a :class:`Group`; None for a lone process, so the
  one-process path has no DDP branches beyond ``group is None``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from pipeline import signals
from pipeline.compute import Compute
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# How long a collective may wait for a rank that does not come. A dead rank is noticed by
# torchrun within a second and the others stopped; this only bounds a live rank that hangs.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class WorkerFailed(PipelineError):
    """A training process failed or was killed; torchrun stopped the others."""


@dataclass(frozen=True)
class Group:
    """One rank of ``world_size``: its global ``rank``, ``local_rank`` on this machine and
    ``device`` (``cuda:<local_rank>`` on GPUs)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that owns the MLflow run and writes the outputs."""
        return self.rank == 0

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_gather_rows(self, rows: np.ndarray) -> list[np.ndarray]:
        """Every rank's [n_r, D] float32 rows (n_r may differ between ranks; a rank with no
        rows may pass [0, 0]), in rank order."""
        comm = self._comm_device()
        shape = torch.tensor(list(rows.shape), device=comm)
        shapes = [torch.zeros_like(shape) for _ in range(self.world_size)]
        dist.all_gather(shapes, shape)
        counts = [int(s[0].item()) for s in shapes]
        width = max(int(s[1].item()) for s in shapes)
        if not max(counts):
            return [np.zeros((0, width), np.float32) for _ in counts]
        padded = torch.zeros((max(counts), width), dtype=torch.float32, device=comm)
        if rows.shape[0]:
            padded[: rows.shape[0]] = torch.from_numpy(np.ascontiguousarray(rows, np.float32))
        out = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(out, padded)
        return [o[:c].cpu().numpy() for o, c in zip(out, counts, strict=True)]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over all ranks (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        dist.barrier()


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def sync_batchnorm_supported(device_type: str) -> bool:
    """``torch.nn.SyncBatchNorm`` runs on GPUs only (torch 2.14 refuses CPU tensors): on
    Gloo/CPU each rank keeps plain BatchNorm over its own share of the batch."""
    return device_type == "cuda"


@contextlib.contextmanager
def joined(compute: Compute) -> Iterator[Group | None]:
    """This process's :class:`Group` when torchrun started it as one of several ranks
    (``compute.launched``), with ``compute.threads`` torch threads; else None."""
    if not compute.launched:
        yield None
        return
    torch.set_num_threads(compute.threads)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if compute.device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(compute.device_type)
    dist.init_process_group(backend_for(device.type), timeout=COLLECTIVE_TIMEOUT)
    group = Group(rank, dist.get_world_size(), local_rank, device)
    if not group.is_main:  # rank 0 speaks for all; the others only warn
        root = logging.getLogger()
        root.setLevel(max(root.getEffectiveLevel(), logging.WARNING))
    try:
        yield group
    finally:
        dist.destroy_process_group()


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n in ("lo", "lo0")), None)


def torchrun(compute: Compute, target: Sequence[str]) -> None:
    """Run ``target`` (``["-m", "stages.train"]``, or a script and its arguments) as
    ``compute.nproc`` ranks on this machine under ``torchrun --standalone``, and wait.

    Each rank gets ``compute.threads`` threads (``OMP_NUM_THREADS``) and, on CPUs, Gloo over
    loopback. SIGTERM or Ctrl-C of this process is passed on to torchrun, which stops every
    rank (rank 0 ends its MLflow run KILLED), and arrives here as the pipeline's own stop
    (``pipeline.signals``) once they are gone. torchrun runs in a session of its own, so a
    Ctrl-C in the terminal reaches it once, through here. A rank that fails or dies makes
    torchrun stop the others; this raises :class:`WorkerFailed`.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={compute.nproc}", "--local-addr=127.0.0.1", *target]
    env = {**os.environ, "OMP_NUM_THREADS": str(compute.threads)}
    if compute.device_type != "cuda" and "GLOO_SOCKET_IFNAME" not in env:
        lo = _loopback_interface()  # one machine: Gloo talks over loopback, whatever the
        if lo:  # host name resolves to
            env["GLOO_SOCKET_IFNAME"] = lo
    log.info("starting %d processes under torchrun (%s, %d threads each)", compute.nproc,
             backend_for(compute.device_type), compute.threads)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt as exc:  # SIGTERM (signals.Terminated) or Ctrl-C
        proc.send_signal(signal.SIGTERM if isinstance(exc, signals.Terminated)
                         else signal.SIGINT)
        proc.wait()  # torchrun stops the ranks (SIGKILL after 30 s) before it exits
        raise
    if code:
        raise WorkerFailed(
            f"training under torchrun failed (exit code {code}): a process failed or was "
            "killed and torchrun stopped the others. The failing rank's error, and torchrun's "
            "report naming it, are above.")
