"""Where a network runs and at what precision, decided on the machine that runs it.

``compute.device`` (``auto | cpu | cuda | cuda:N | mps``) and ``train.precision`` (``auto | fp32
| bf16 | fp16``) are resolved here for training, and the same rules run again when a logged
model is loaded: a model picks the consumer's device and the precision that device supports,
whatever machine trained it (a model trained in bf16 on a GPU runs in fp32 on a CPU without
native bf16).

The precision policy:

=========  ==============================================  ==============================
device     ``auto``                                         reduced-precision training
=========  ==============================================  ==============================
CPU        bf16 where the CPU has native bf16, else fp32    bf16 autocast
CUDA       bf16 where the GPU supports it, else fp16        bf16, or fp16 + a GradScaler
MPS        fp32                                             (not used)
=========  ==============================================  ==============================

Part of the model package: torch only (torch >= 2.4).
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import torch

from pipeline.model.errors import ModelError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ModelError):
    """The requested device or precision does not exist on this machine."""


def cpu_bf16_supported() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cuda_bf16_supported() -> bool:
    """True where the current GPU computes bf16 natively (Ampere and newer)."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when ``torch.cuda.is_available()``, else MPS, else the CPU; ``cuda``
    -> the current GPU; ``cuda:N`` and ``mps`` are checked. :class:`DeviceError` names what
    is missing."""
    text = str(requested)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not mps_available():
            raise DeviceError("device mps: this machine has no usable Apple MPS device; use "
                              "auto or cpu")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not match:
        raise DeviceError(f"device {text!r}: expected auto, cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build"
        raise DeviceError(
            f"device {text}: torch.cuda.is_available() is False here (torch "
            f"{torch.__version__}, {build}; no GPU or driver visible). Use auto or cpu.")
    index = int(match.group(1)) if match.group(1) else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(f"device {text}: only {count} GPU(s) visible (cuda:0..cuda:"
                          f"{count - 1}); check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", index)


def device_count(device_type: str) -> int:
    """How many devices of this type the machine shows (GPUs; 1 for the CPU and MPS)."""
    return torch.cuda.device_count() if device_type == "cuda" else 1


def device_name(device: torch.device) -> str:
    """A person's name for the device: the GPU model, or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


def resolve_precision(requested: str, device: torch.device | str = "cpu") -> str:
    """``auto`` -> what the device computes fastest without losing the result (table above);
    an explicit ``fp32``/``bf16``/``fp16`` is checked against the device."""
    device = torch.device(device)
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if cuda_bf16_supported() else "fp16"
        if device.type == "cpu":
            return "bf16" if cpu_bf16_supported() else "fp32"
        return "fp32"
    if requested not in PRECISIONS:
        raise DeviceError(f"precision {requested!r}: expected auto, fp32, bf16 or fp16")
    if requested == "fp32":
        return requested
    if device.type == "mps":
        raise DeviceError(f"precision {requested} on mps: use fp32 (or auto) on Apple GPUs")
    if device.type == "cpu" and requested == "fp16":
        raise DeviceError("precision fp16 needs a CUDA GPU: on a CPU use auto, bf16 or fp32")
    if device.type == "cpu" and not cpu_bf16_supported():
        log.warning("precision bf16 on a CPU without native bf16: emulated, slower")
    if device.type == "cuda" and requested == "bf16" and not cuda_bf16_supported():
        log.warning("precision bf16 on a GPU without native bf16: emulated, slower")
    return requested


def inference_precision(trained: str, device: torch.device | str) -> str:
    """The precision a trained model runs at on ``device``: fp32 when it was trained in fp32
    (its features were), else what ``auto`` gives on this device (never copied from the
    machine that trained it)."""
    return "fp32" if trained == "fp32" else resolve_precision("auto", device)


def autocast(precision: str, device: torch.device | str = "cpu"
             ) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on ``device``'s type, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])


def needs_grad_scaler(precision: str, device: torch.device | str) -> bool:
    """fp16 gradients underflow without loss scaling (bf16 keeps fp32's exponent range)."""
    return precision == "fp16" and torch.device(device).type == "cuda"
