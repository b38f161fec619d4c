"""Where a backbone's starting weights come from (``model.weights``): torchvision's ImageNet
weights, a seeded random init, or a state dict file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torchvision
from torch import nn

from pipeline.model.errors import WeightsError
from pipeline.model.network import torchvision_builder


def imagenet_weights(arch: str):
    """torchvision's default ImageNet weights enum for ``arch``."""
    return torchvision.models.get_model_weights(arch).DEFAULT


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision looks for the cached ImageNet weights file."""
    url = imagenet_weights(arch).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _load_imagenet_state(arch: str) -> dict:
    weights = imagenet_weights(arch)
    target = imagenet_weights_file(arch)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise WeightsError(
            f"model.weights=imagenet: {weights} is not cached and could not be downloaded "
            f"({exc}). Place the file {target.name} at {target} (from {weights.url}; "
            "TORCH_HOME moves the folder), or use model.weights=none or a path to a state dict."
        ) from exc


def load_state_file(path: Path) -> dict:
    """A state dict from a ``torch.save`` file (a bare one or ``{"state_dict": ...}``)."""
    if not path.is_file():
        raise WeightsError(
            f"model.weights={path}: no such file. Use imagenet, none or a path to a state dict."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise WeightsError(f"model.weights={path}: not a torch state dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"model.weights={path}: expected a state dict, got {type(state)}")
    return state


def build_backbone(arch: str, weights: str, init_seed: int = 0) -> tuple[nn.Module, str]:
    """A torchvision backbone with ``fc`` removed, and a description of the weights used.

    ``weights``: ``imagenet`` (torch cache, or download when online), ``none`` (random init
    seeded by ``init_seed``) or a path to a state dict (a full model's or a backbone's).
    """
    builder = torchvision_builder(arch)
    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = builder(weights=None)
        used = f"none (random init, seed {init_seed})"
    else:
        if weights == "imagenet":
            state = _load_imagenet_state(arch)
            used = f"imagenet ({imagenet_weights(arch)})"
        else:
            path = Path(weights).expanduser()
            state = load_state_file(path)
            used = f"file {path}"
        # The backbone takes the loaded tensors as they are (float ones as float32, what
        # copying into a float32 parameter gives): built on the meta device, it skips a
        # random init that would be overwritten (~0.5 s for a ResNet50 on 2 cores).
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
        state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                 for k, v in state.items() if not k.startswith(("fc.", "head."))}
        with torch.device("meta"):
            model = builder(weights=None)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:  # a tensor of the wrong shape
            raise WeightsError(f"model.weights={weights}: does not fit {arch} ({exc})") from exc
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise WeightsError(
                f"model.weights={weights}: does not fit {arch} "
                f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
            )
    model.fc = nn.Identity()
    return model, used
