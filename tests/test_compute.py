"""Where work runs: the ``compute`` params resolved on this machine (mocked GPUs), and as one
rank of several that torchrun started."""

import pytest
from helpers import tiny_params

from pipeline import compute
from pipeline.compute import resolve_compute
from pipeline.model.devices import DeviceError


def test_compute_on_this_cpu(gpus, monkeypatch):
    gpus(0)
    monkeypatch.setattr(compute, "cpu_cores", lambda: 8)
    c = resolve_compute(tiny_params(compute={"num_workers": "auto"}).compute)
    assert (c.device, c.nproc, c.num_workers) == ("cpu", 1, 0)
    assert c.as_params()["resolved.device"] == "cpu"
    assert not c.needs_launch
    c = resolve_compute(tiny_params(compute={"nproc": 2}).compute)
    assert (c.nproc, c.threads) == (2, 4)  # cores // nproc per rank
    assert c.needs_launch  # the stage starts the ranks under torchrun
    assert resolve_compute(tiny_params(compute={"nproc": "auto"}).compute).nproc == 1
    with pytest.raises(DeviceError, match="compute.device cuda"):
        resolve_compute(tiny_params(compute={"device": "cuda"}).compute)


def test_compute_with_gpus(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setattr(compute, "cpu_cores", lambda: 16)
    c = resolve_compute(tiny_params(compute={"nproc": "auto", "num_workers": "auto"}).compute)
    assert (c.device, c.nproc, c.precision, c.device_count) == ("cuda", 4, "bf16", 4)
    assert c.num_workers == 3  # 16 cores / 4 processes, one left for the process itself
    one = resolve_compute(tiny_params(compute={"device": "cuda:2"}).compute)
    assert (one.device, one.nproc, one.device_name) == ("cuda:2", 1, "Mocked GPU")
    assert resolve_compute(tiny_params(compute={"num_workers": "auto"}).compute).num_workers == 8
    with pytest.raises(DeviceError, match="only 4 GPU"):
        resolve_compute(tiny_params(compute={"nproc": 5, "device": "cuda"}).compute)


def test_a_rank_started_by_torchrun_takes_its_numbers_from_torchrun(gpus, monkeypatch):
    """Two machines of two GPUs each (`torchrun --nnodes=2 --nproc-per-node=2`): 4 processes
    in all, 2 on this machine, whatever compute.nproc says; it is not launched again."""
    gpus(2)
    monkeypatch.setattr(compute, "cpu_cores", lambda: 16)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    c = resolve_compute(tiny_params(compute={"device": "cuda", "num_workers": "auto"}).compute)
    assert (c.device, c.nproc, c.threads, c.num_workers) == ("cuda", 4, 8, 7)
    assert c.launched and not c.needs_launch
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: a lone process
    assert not resolve_compute(tiny_params().compute).launched
