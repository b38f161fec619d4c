"""The network: a torchvision ResNet50 backbone plus the reference head, the transform
presets, freezing, and the CPU precision policy.

Self-contained (torch, torchvision and ``imaging``): the logged MLflow model carries this
file, so training, evaluation and serving share one preprocessing and one forward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision import transforms as T

try:  # inside the repository
    from pipeline.errors import PipelineError
except ModuleNotFoundError:  # inside a logged MLflow model, where only this file is carried
    PipelineError = RuntimeError  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FEATURE_DIM = {"resnet50": 2048}
# Bumped whenever the preprocessing code changes in a way the parameters do not show, so
# cached features computed by older code can never be reused.
PREPROCESSING_VERSION = 1


class WeightsError(PipelineError):
    """Pretrained weights are unavailable (offline and not cached) or a state dict is invalid."""


def eval_resize_crop(image_size: int) -> T.Compose:
    """The geometric half of the eval preset: PIL RGB -> PIL RGB of S x S."""
    return T.Compose(
        [
            T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
            T.CenterCrop(image_size),
        ]
    )


def eval_transform(image_size: int) -> T.Compose:
    """Eval preset: resize the shorter side, centre crop, ImageNet normalisation -> [3,S,S]."""
    return T.Compose(
        [eval_resize_crop(image_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def eval_pixels(img, image_size: int, resize_crop: T.Compose | None = None) -> np.ndarray:
    """A decoded RGB PIL image -> its [S,S,3] uint8 pixels after :func:`eval_resize_crop`."""
    return np.array((resize_crop or eval_resize_crop(image_size))(img))  # writable: torch wants it


def normalize_batch(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[N,S,S,3] uint8 pixels -> [N,3,S,S] float32 in channels_last memory, ImageNet-normalised.

    The same arithmetic as ``ToTensor`` + ``Normalize`` (bit for bit, tested), done once per
    batch: uint8 crosses from the decoding worker (4x less than float32) and NHWC pixels
    are already the channels_last layout the network runs in.
    """
    x = torch.as_tensor(pixels).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x.float().div(255).sub(mean).div(std).contiguous(memory_format=torch.channels_last)


def train_transform(image_size: int) -> T.Compose:
    """Train preset (only with ``train.augment``): random resized crop and horizontal flip."""
    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(0.5, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def preprocessing_spec(image_size: int) -> dict:
    """Everything that determines the eval preprocessing (part of the feature-cache key)."""
    return {
        "version": PREPROCESSING_VERSION,
        "decode": "PIL, RGB, JPEG draft to >= image_size",
        "resize": image_size,
        "interpolation": "bilinear-antialias",
        "crop": image_size,
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }


# --- precision ---------------------------------------------------------------------------


def bf16_supported() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(requested: str) -> str:
    """``auto`` -> bf16 where the CPU supports it natively, else fp32."""
    if requested == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if requested == "bf16" and not bf16_supported():
        log.warning("train.precision=bf16 on a CPU without native bf16: emulated, slower")
    return requested


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- model -------------------------------------------------------------------------------


class Head(nn.Sequential):
    """The reference head: Linear(2048->hidden)-ReLU-Dropout-Linear(hidden->C)-LogSoftmax.

    ``feature_norm`` puts a BatchNorm1d (no affine) in front: features of a randomly
    initialised ResNet50 are large, nearly constant vectors (mean ~15, tiny differences
    between images) on which the plain head does not learn; standardising them fixes that.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 512, dropout: float = 0.2,
                 feature_norm: bool = False):
        norm = [nn.BatchNorm1d(in_dim, affine=False)] if feature_norm else []
        super().__init__(
            *norm,
            nn.Linear(in_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
            nn.LogSoftmax(dim=1),
        )


class FoodNet(nn.Module):
    """Backbone (fc removed, [N,3,S,S] -> [N,2048]) followed by the head (-> [N,C] log-probs)."""

    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _torchvision_builder(arch: str):
    if arch not in FEATURE_DIM:
        raise WeightsError(f"model.arch={arch!r}: supported: {', '.join(FEATURE_DIM)}")
    return getattr(torchvision.models, arch)


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


def _load_state_file(path: Path) -> dict:
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
    builder = _torchvision_builder(arch)
    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = builder(weights=None)
        used = f"none (random init, seed {init_seed})"
    else:
        model = builder(weights=None)
        if weights == "imagenet":
            state = _load_imagenet_state(arch)
            used = f"imagenet ({imagenet_weights(arch)})"
        else:
            path = Path(weights).expanduser()
            state = _load_state_file(path)
            used = f"file {path}"
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise WeightsError(
                f"model.weights={weights}: does not fit {arch} "
                f"(missing {missing[:3]}..., unexpected {unexpected[:3]}...)"
            )
    model.fc = nn.Identity()
    return model, used


def build_model(
    arch: str,
    num_classes: int,
    hidden: int,
    dropout: float,
    backbone: nn.Module | None = None,
    feature_norm: bool = False,
) -> FoodNet:
    """FoodNet with the given (or an empty random) backbone and a fresh head."""
    if backbone is None:
        backbone = _torchvision_builder(arch)(weights=None)
        backbone.fc = nn.Identity()
    head = Head(FEATURE_DIM[arch], num_classes, hidden, dropout, feature_norm)
    return FoodNet(backbone, head)


def frozen_modules(model: FoodNet, freeze: str) -> list[nn.Module]:
    """The backbone parts that ``model.freeze`` keeps fixed (weights and BatchNorm stats)."""
    if freeze == "backbone":
        return [model.backbone]
    if freeze == "layer4":
        return [m for name, m in model.backbone.named_children() if name != "layer4"]
    return []


def apply_freeze(model: FoodNet, freeze: str) -> None:
    """Stop gradients into the frozen parts."""
    for module in frozen_modules(model, freeze):
        for p in module.parameters():
            p.requires_grad_(False)


def set_train_mode(model: nn.Module, freeze: str | None = None) -> None:
    """``model.train()``, but frozen parts stay in eval mode: BatchNorm statistics never move."""
    model.train()
    if isinstance(model, FoodNet) and freeze:
        for module in frozen_modules(model, freeze):
            module.eval()


def state_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def prepare_for_inference(module: nn.Module) -> nn.Module:
    """eval mode + channels_last."""
    return module.eval().to(memory_format=torch.channels_last)


# How features are computed, beyond the weights: part of the feature-cache key.
INFERENCE_GRAPH = "fx conv+bn folded, channels_last"


def inference_backbone(backbone: nn.Module) -> nn.Module:
    """A frozen copy of ``backbone`` for feature extraction: BatchNorm folded into the
    convolutions (torch.fx) and channels_last memory format.

    Measured on 2 CPU threads at 128 px, batch 16: 72 img/s eager channels_last -> 92 img/s
    folded; features differ from eager fp32 by ~1e-6 relative. Training, evaluation and the
    logged model all extract through this one function.
    """
    import copy

    from torch.fx.experimental.optimization import fuse

    fused = fuse(copy.deepcopy(backbone).eval(), inplace=True)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused.to(memory_format=torch.channels_last).eval()


@torch.inference_mode()
def extract_features(backbone: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """[N,3,S,S] normalised images -> [N,2048] float32 features.

    ``backbone``: what :func:`inference_backbone` returns (or any module in eval mode).
    """
    x = x.contiguous(memory_format=torch.channels_last)
    with autocast(precision):
        feats = backbone(x)
    return feats.float()
