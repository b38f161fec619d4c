"""Where the pipeline computes, resolved once on this machine: the ``compute`` params (and
``train.precision``) become a :class:`Compute` before any work, in one place that ``train``
and ``evaluate`` both use.

A process started by ``torchrun`` as one of several (``TORCHELASTIC_RUN_ID`` and
``WORLD_SIZE`` > 1 in its environment) is one rank: its process count is torchrun's world
size, its threads and decoding workers are its share of this machine
(``LOCAL_WORLD_SIZE`` processes here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pipeline.config import ComputeConfig
from pipeline.model.devices import (
    DeviceError,
    device_count,
    device_name,
    resolve_device,
    resolve_precision,
)


@dataclass(frozen=True)
class Compute:
    """Where work runs, resolved on this machine from the ``compute`` params."""

    device: str  # "cpu", "cuda:0", "mps"; "cuda" with several processes (rank r: cuda:r)
    device_name: str  # the GPU or CPU model
    device_count: int  # devices of this type the machine shows
    precision: str  # fp32 | bf16 | fp16 (autocast; fp16 with a GradScaler)
    nproc: int  # training processes in all (DDP when > 1)
    num_workers: int  # decoding workers per process
    threads: int  # torch threads per process
    feature_batch_size: int = 16  # images per extraction batch
    compile: str = "auto"  # torch.compile the extraction: auto | always | never
    launched: bool = False  # this process is one rank that torchrun started

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @property
    def needs_launch(self) -> bool:
        """Several processes asked for, and this is not one of them yet: start them."""
        return self.nproc > 1 and not self.launched

    def as_params(self) -> dict:
        """The ``resolved.*`` MLflow params."""
        return {"resolved.device": self.device, "resolved.device_name": self.device_name,
                "resolved.device_count": self.device_count, "resolved.nproc": self.nproc,
                "resolved.num_workers": self.num_workers, "resolved.torch_threads": self.threads}


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def torchrun_world() -> tuple[int, int] | None:
    """(world size, processes on this machine) when torchrun started this process as one of
    several; else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    world = int(os.environ.get("WORLD_SIZE", 1))
    return (world, int(os.environ.get("LOCAL_WORLD_SIZE", world))) if world > 1 else None


def loader_workers(requested: int | str, device_type: str, nproc: int = 1) -> int:
    """Decoding worker processes per process for ``compute.num_workers``.

    ``auto``: none on a CPU (measured on 2 cores: a worker competes with the compute threads,
    decoding between batches is faster; docs/figures.md "Speed on a CPU"), and on a GPU the
    cores this process may use, less one for itself, up to 8 (the GPU waits on decoding
    otherwise).
    """
    if requested != "auto":
        return int(requested)
    if device_type == "cpu":
        return 0
    return max(1, min(8, cpu_cores() // max(nproc, 1) - 1))


def resolve_compute(cfg: ComputeConfig, precision: str = "auto") -> Compute:
    """The ``compute`` params (and ``train.precision``) on this machine;
    :class:`DeviceError` (naming the param) when the machine lacks what they ask for."""
    try:
        device = resolve_device(cfg.device)
    except DeviceError as exc:
        raise DeviceError(f"compute.{exc}") from None
    try:
        precision = resolve_precision(precision, device)
    except DeviceError as exc:
        raise DeviceError(f"train.{exc}") from None
    gpus = device_count(device.type)
    world = torchrun_world()
    if world is not None:  # one rank of torchrun's processes: its numbers, not the params'
        nproc, local = world
    elif cfg.nproc == "auto":  # every visible GPU; one process elsewhere (or for cuda:N)
        nproc = local = gpus if device.type == "cuda" and cfg.device in ("auto", "cuda") else 1
    else:
        nproc = local = cfg.nproc
    if device.type == "cuda" and local > gpus:
        raise DeviceError(f"compute.nproc={local}: only {gpus} GPU(s) visible; one process "
                          "per GPU (compute.nproc=auto uses them all)")
    if device.type == "mps" and nproc > 1:
        raise DeviceError("compute.nproc must be 1 on Apple MPS (DDP runs on CUDA or CPU)")
    label = "cuda" if nproc > 1 and device.type == "cuda" else str(device)  # rank r: cuda:r
    threads = max(1, cpu_cores() // local) if local > 1 else torch.get_num_threads()
    return Compute(label, device_name(device), gpus, precision, nproc,
                   loader_workers(cfg.num_workers, device.type, local), threads,
                   cfg.feature_batch_size, cfg.compile, launched=world is not None)
