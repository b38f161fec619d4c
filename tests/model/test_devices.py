"""Device and precision resolution, on the machine that runs the code. CUDA and MPS are mocked
(``torch.cuda.*`` answers) only to check what is *chosen*; nothing here runs on a GPU."""

import pytest
import torch

from pipeline.model import devices
from pipeline.model.devices import (
    DeviceError,
    autocast,
    inference_precision,
    needs_grad_scaler,
    resolve_device,
    resolve_precision,
)


def test_auto_is_the_cpu_without_a_gpu(gpus):
    gpus(0)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="torch.cuda.is_available\\(\\) is False"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="no usable Apple MPS"):
        resolve_device("mps")


def test_auto_prefers_cuda_then_mps(gpus, monkeypatch):
    gpus(2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="only 2 GPU"):
        resolve_device("cuda:2")
    gpus(0)
    monkeypatch.setattr(devices, "mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")


def test_the_precision_policy_per_device(gpus, monkeypatch):
    monkeypatch.setattr(devices, "cpu_bf16_supported", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(devices, "cpu_bf16_supported", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(DeviceError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")
    gpus(1, bf16=True)
    assert resolve_precision("auto", "cuda:0") == "bf16"
    gpus(1, bf16=False)  # pre-Ampere: fp16, trained with a gradient scaler
    assert resolve_precision("auto", "cuda:0") == "fp16"
    assert needs_grad_scaler("fp16", "cuda:0") and not needs_grad_scaler("bf16", "cuda:0")
    assert not needs_grad_scaler("fp32", "cuda:0")
    assert resolve_precision("auto", "mps") == "fp32"
    with pytest.raises(DeviceError, match="on mps"):
        resolve_precision("bf16", "mps")


def test_inference_precision_is_the_consumers_not_the_trainers(gpus, monkeypatch):
    """A model trained in bf16 (on a GPU) runs in fp32 on a CPU without native bf16, in bf16
    on one with it, and at the GPU's own reduced precision on a GPU; fp32 stays fp32."""
    monkeypatch.setattr(devices, "cpu_bf16_supported", lambda: False)
    assert inference_precision("bf16", "cpu") == "fp32"
    assert inference_precision("fp16", "cpu") == "fp32"
    monkeypatch.setattr(devices, "cpu_bf16_supported", lambda: True)
    assert inference_precision("bf16", "cpu") == "bf16"
    assert inference_precision("fp32", "cpu") == "fp32"
    gpus(1, bf16=False)
    assert inference_precision("bf16", "cuda:0") == "fp16"
    assert inference_precision("fp32", "cuda:0") == "fp32"


def test_autocast_follows_the_device_type():
    assert isinstance(autocast("fp32", "cpu"), type(autocast("fp32", "cuda")))
    with autocast("bf16", "cpu"):
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_device_name_and_count_on_this_machine():
    assert devices.device_name(torch.device("cpu"))
    assert devices.device_count("cpu") == 1
