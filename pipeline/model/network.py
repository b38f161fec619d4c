"""The network: a torchvision backbone with ``fc`` removed, the reference head, and freezing.

Change the head here (:class:`Head`); the model card records its settings (:class:`HeadSpec`).

torchvision is imported where a backbone is built, not with this module: importing it costs
about 1.1 s a process (it imports ``torch._dynamo``), which a stage that only runs the head
on cached features (``evaluate`` in a head-only experiment) need not pay.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.model.errors import WeightsError

FEATURE_DIM = {"resnet50": 2048}


@dataclass(frozen=True)
class HeadSpec:
    """The head's settings (``model.hidden``, ``model.dropout``, ``model.feature_norm``)."""

    hidden: int = 512
    dropout: float = 0.2
    feature_norm: bool = False


class Head(nn.Sequential):
    """The reference head: Linear(2048->hidden)-ReLU-Dropout-Linear(hidden->C)-LogSoftmax.

    ``feature_norm`` puts a BatchNorm1d (no affine) in front: features of a randomly
    initialised ResNet50 are large, nearly constant vectors (mean ~15, tiny differences
    between images) on which the plain head does not learn; standardising them fixes that.
    """

    def __init__(self, in_dim: int, num_classes: int, spec: HeadSpec):
        norm = [nn.BatchNorm1d(in_dim, affine=False)] if spec.feature_norm else []
        super().__init__(
            *norm,
            nn.Linear(in_dim, spec.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(spec.dropout),
            nn.Linear(spec.hidden, num_classes),
            nn.LogSoftmax(dim=1),
        )


class FoodNet(nn.Module):
    """Backbone ([N,3,S,S] -> [N,2048]) followed by the head (-> [N,C] log-probabilities)."""

    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def feature_dim(arch: str) -> int:
    """The width of ``arch``'s features (one of :data:`FEATURE_DIM`)."""
    if arch not in FEATURE_DIM:
        raise WeightsError(f"model.arch={arch!r}: supported: {', '.join(FEATURE_DIM)}")
    return FEATURE_DIM[arch]


def torchvision_builder(arch: str):
    """torchvision's constructor for ``arch`` (one of :data:`FEATURE_DIM`)."""
    feature_dim(arch)
    import torchvision  # here, not at the top: see the module's docstring

    return getattr(torchvision.models, arch)


def empty_backbone(arch: str) -> nn.Module:
    """An uninitialised-weights backbone of ``arch`` with ``fc`` removed."""
    backbone = torchvision_builder(arch)(weights=None)
    backbone.fc = nn.Identity()
    return backbone


def build_model(arch: str, num_classes: int, head: HeadSpec,
                backbone: nn.Module | None = None) -> FoodNet:
    """FoodNet with the given (or an empty random) backbone and a fresh head."""
    return FoodNet(backbone if backbone is not None else empty_backbone(arch),
                   Head(feature_dim(arch), num_classes, head))


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
    return _tensors_digest(module.state_dict().items())


def backbone_digest(state: dict[str, torch.Tensor]) -> str:
    """:func:`state_digest` of the backbone of a :class:`FoodNet` whose state dict is
    ``state``, without building it (the same digest: tested)."""
    prefix = "backbone."
    return _tensors_digest((k[len(prefix):], v) for k, v in state.items()
                           if k.startswith(prefix))


def _tensors_digest(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, tensor in items:
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
