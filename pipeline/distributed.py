"""Several training processes through PyTorch's own launcher, and what they share.

:func:`launch` starts N workers on this machine with ``torch.distributed``'s elastic launch API
(what ``torchrun --standalone --nproc-per-node=N`` runs): a standalone c10d rendezvous on a free
loopback port (queued experiments never collide on one fixed port), no restarts, one process
group (NCCL on GPUs, Gloo on CPUs). A worker that dies stops the others and the launch raises
:class:`WorkerFailed` naming it; SIGTERM and Ctrl-C of the launching process stop every worker
and arrive as the pipeline's own stop (``pipeline.signals``). On Linux each worker asks the
kernel to kill it when the launching process dies (``PR_SET_PDEATHSIG``), so not even a
SIGKILL of the stage leaves one behind.

:class:`Group` is one worker's view of the others: its rank, the world size, its device, and
the two collectives the pipeline needs (gather rows, sum numbers).

:func:`global_batch` makes N processes compute what one process computes on the same global
batch: BatchNorm statistics over the whole global batch (:class:`GlobalBatchNorm`, any device
and backend) and dropout masks that are the rows of the one mask a single process would draw
(:class:`GlobalDropout`). With ``train.batch_size`` the global batch and a
``DistributedSampler``, ``train.nproc`` then changes the speed, not the result (up to the order
of floating-point sums).

Several machines are torchrun's own job: started by an outside ``torchrun --nnodes=M ...``,
the train stage joins that group instead (:func:`torchrun_group`; README "Several GPUs and
machines").
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline import signals
from pipeline.errors import USER_ERRORS, PipelineError

log = logging.getLogger(__name__)

# How long a collective may wait for a rank that does not come. A dead rank is noticed by the
# launcher within a second; this only bounds a live rank that hangs.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


class WorkerFailed(PipelineError):
    """A training worker failed or was killed; the others were stopped."""


@dataclass(frozen=True)
class Group:
    """One worker of ``world_size``: its global ``rank``, ``local_rank`` on this machine and
    ``device`` (``cuda:<local_rank>`` on GPUs)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that talks to MLflow and hands the result back."""
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

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object), on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class _AllReduceSum(torch.autograd.Function):
    """Sum over the ranks, differentiable: the gradient of a sum is the sum of the ranks'
    gradients (what ``torch.distributed.nn.functional.all_reduce`` did before it was
    deprecated)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d/2d) whose training statistics are those of the global batch: the sums
    are all-reduced over the ranks (autograd-aware, so gradients flow as for one process).
    Same parameters and buffers as the layer it replaces (the same state dict)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected a 2D or larger input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() < 2:
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.full((1,), x.numel() / c, dtype=torch.float32, device=x.device)
        sums = all_reduce(torch.cat([xf.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = xf - mean.view(shape)  # two passes: features can be large and alike
        var = all_reduce((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))
                unbiased = var * (n / torch.clamp(n - 1, min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        return y.to(x.dtype)


class GlobalDropout(nn.Dropout):
    """Dropout that draws the mask of the whole global batch (every rank draws the same, from
    the same seed) and keeps this rank's rows: rank r of W has rows r, r+W, ... of the global
    batch (``DistributedSampler``'s order), the masks one process would have used."""

    def __init__(self, p: float, rank: int, world_size: int):
        super().__init__(p)
        self.rank, self.world_size = rank, world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        noise = torch.empty((x.shape[0] * self.world_size, *x.shape[1:]), dtype=x.dtype,
                            device=x.device).bernoulli_(1 - self.p)  # as torch's own dropout
        return x * noise[self.rank :: self.world_size].div_(1 - self.p)


def global_batch(module: nn.Module, group: Group) -> nn.Module:
    """``module`` with its BatchNorm and Dropout layers replaced (in place) by
    :class:`GlobalBatchNorm` / :class:`GlobalDropout`; the state dict is unchanged."""
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                  child.track_running_stats, device=_device_of(child))
            new.load_state_dict(child.state_dict())
            if child.affine:
                new.weight.requires_grad_(child.weight.requires_grad)
                new.bias.requires_grad_(child.bias.requires_grad)
            new.train(child.training)
            setattr(module, name, new)
        elif type(child) is nn.Dropout:
            new = GlobalDropout(child.p, group.rank, group.world_size)
            new.train(child.training)
            setattr(module, name, new)
        else:
            global_batch(child, group)
    return module


def _device_of(module: nn.Module) -> torch.device | None:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return None


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel SIGKILLs this process when the launching process dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # it died before the request took effect
        os._exit(1)


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in names if n in ("lo", "lo0")), None)


def _entry(fn: Callable[..., Any], parent_pid: int, device_type: str, threads: int,
           workdir: str, log_level: int, args: tuple) -> Any:
    """What each launched worker runs: tie itself to the launcher, set its threads, logging
    and device, join the process group, run ``fn(group, *args)``."""
    _die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    rank = int(os.environ["RANK"])
    logging.basicConfig(  # rank 0 speaks for all; the others only warn
        level=log_level if rank == 0 else max(log_level, logging.WARNING),
        format=f"%(asctime)s %(levelname)s %(name)s [rank {rank}]: %(message)s",
        datefmt="%H:%M:%S")
    if device_type != "cuda" and "GLOO_SOCKET_IFNAME" not in os.environ:
        lo = _loopback_interface()  # one machine: Gloo talks over loopback, whatever the
        if lo:  # host name resolves to
            os.environ["GLOO_SOCKET_IFNAME"] = lo
    group = _join(device_type)
    try:
        return fn(group, *args)
    except USER_ERRORS as exc:  # the launcher reports this message, not a traceback
        Path(workdir, f"error-rank{group.rank}.txt").write_text(str(exc))
        raise
    finally:
        dist.destroy_process_group()


def _join(device_type: str, timeout: timedelta = COLLECTIVE_TIMEOUT) -> Group:
    """Join the process group that the launcher's environment describes (``env://``)."""
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    dist.init_process_group(backend_for(device_type), timeout=timeout)
    return Group(rank, world_size, local_rank, device)


@contextlib.contextmanager
def torchrun_group(device_type: str) -> Iterator[Group | None]:
    """This process's :class:`Group` when an outside ``torchrun`` started it as one of
    several workers (``TORCHELASTIC_RUN_ID`` and ``WORLD_SIZE`` > 1 in the environment: the
    multi-machine form), with ``cores // LOCAL_WORLD_SIZE`` torch threads; else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or int(os.environ.get("WORLD_SIZE", 1)) < 2:
        yield None
        return
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(1, cpu_cores() // local_size))
    group = _join(device_type)
    if not group.is_main:  # rank 0 speaks for all; the others only warn
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))
    try:
        yield group
    finally:
        dist.destroy_process_group()


def _describe(failures: dict) -> str:
    parts = []
    for rank, failure in sorted(failures.items()):
        if failure.exitcode is not None and failure.exitcode < 0:
            how = f"was killed by {signal.Signals(-failure.exitcode).name}"
        else:
            how = f"exited with code {failure.exitcode}"
        parts.append(f"rank {rank} (pid {failure.pid}) {how}")
    return "; ".join(parts)


def launch(fn: Callable[..., Any], args: tuple, *, nproc: int, device_type: str,
           threads: int, workdir: Path) -> None:
    """Run ``fn(group, *args)`` in ``nproc`` worker processes on this machine; return when all
    of them have finished. ``fn`` must be importable (a module-level function).

    ``threads``: torch threads per worker. ``workdir``: the launcher's logs and the workers'
    error messages (the caller's temporary folder). Raises :class:`WorkerFailed` when a worker
    fails (with its own message for a user error), ``signals.Terminated`` /
    ``KeyboardInterrupt`` when this process is stopped (the workers are stopped first).
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    workdir.mkdir(parents=True, exist_ok=True)
    settings = dict(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"food101-{uuid.uuid4().hex[:12]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # torchrun --standalone: a free port, chosen now
        local_addr="127.0.0.1",  # the workers' MASTER_ADDR: loopback, not the host name
        max_restarts=0,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(workdir / "logs")),
    )
    known = {f.name for f in dataclasses.fields(LaunchConfig)}  # older torch lacks a few
    config = LaunchConfig(**{k: v for k, v in settings.items() if k in known})
    # The launcher replaces these handlers while it runs (its own clean shutdown of the
    # workers) and does not put them back.
    stops = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]
    saved = {s: signal.getsignal(s) for s in stops}
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.WARNING)  # not a screen of launch settings per run
    log.info("starting %d workers (%s, %d threads each)", nproc, backend_for(device_type),
             threads)
    try:
        elastic_launch(config, _entry)(fn, os.getpid(), device_type, threads, str(workdir),
                                       logging.getLogger().getEffectiveLevel(), args)
    except SignalException as exc:
        if exc.sigval == signal.SIGTERM:
            raise signals.Terminated("SIGTERM") from None
        raise KeyboardInterrupt from None
    except ChildFailedError as exc:
        messages = sorted(workdir.glob("error-rank*.txt"))
        if messages:
            raise WorkerFailed(messages[0].read_text()) from None
        raise WorkerFailed(
            f"a training worker failed: {_describe(exc.failures)}. The other workers were "
            "stopped; the failing worker's own output is above."
        ) from None
    finally:
        for s, handler in saved.items():
            if handler is not None:
                signal.signal(s, handler)
        elastic_log.setLevel(level)
