"""Running a trained network: the BatchNorm-folded backbone that every extraction runs on, and
batch inference from raw images on the device and at the precision resolved for the machine
that runs it (``pipeline.model.devices``).

Feature extraction over manifests (the cache, ``torch.compile``) builds on these in
``pipeline.features``; the logged model's pyfunc calls :func:`load_classifier`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.model.card import ModelCard
from pipeline.model.devices import autocast, inference_precision, resolve_device
from pipeline.model.errors import ImageDecodeError
from pipeline.model.imaging import ImageSource, load_image
from pipeline.model.network import FoodNet
from pipeline.model.presets import eval_pixels, eval_resize_crop, normalize_batch

log = logging.getLogger(__name__)

# How features are computed, beyond the weights: part of the feature-cache key.
INFERENCE_GRAPH = "fx conv+bn folded, channels_last"


def inference_backbone(backbone: nn.Module, device: torch.device | str | None = None
                       ) -> nn.Module:
    """A frozen copy of ``backbone`` for feature extraction on ``device`` (default: where it
    is): BatchNorm folded into the convolutions (torch.fx) and channels_last memory format.

    Features differ from the eager fp32 backbone by ~1e-6 relative; training, evaluation and
    the logged model all extract through this one function.
    """
    from torch.fx.experimental.optimization import fuse

    fused = fuse(copy.deepcopy(backbone).eval(), inplace=True)
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused.to(device=device, memory_format=torch.channels_last).eval()


@torch.inference_mode()
def extract_features(backbone: nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """[N,3,S,S] normalised images -> [N,2048] float32 features, on the device of ``x``
    (autocast to ``precision`` there).

    ``backbone``: what :func:`inference_backbone` returns (or any module in eval mode), on
    the same device as ``x``.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    with autocast(precision, x.device):
        feats = backbone(x)
    return feats.float()


class Classifier:
    """A trained :class:`FoodNet` run on raw images: decode, eval preset, folded backbone,
    head.

    ``device`` (``auto``: a GPU when there is one) and the inference precision are resolved
    here, on the machine that runs it: ``trained_precision`` only says whether the model was
    trained in fp32 (then it runs in fp32) or in reduced precision (then it runs at what
    ``auto`` gives on this device; see :func:`devices.inference_precision`).
    """

    def __init__(self, net: FoodNet, image_size: int, trained_precision: str,
                 device: torch.device | str = "auto"):
        self.device = resolve_device(device)
        self.precision = inference_precision(trained_precision, self.device)
        self.net = net.eval().to(device=self.device, memory_format=torch.channels_last)
        self.image_size = image_size
        self.resize_crop = eval_resize_crop(image_size)
        self._backbone: nn.Module | None = None

    @property
    def backbone(self) -> nn.Module:
        """The folded backbone, built on first use."""
        if self._backbone is None:
            self._backbone = inference_backbone(self.net.backbone)
        return self._backbone

    def pixels(self, source: ImageSource) -> np.ndarray:
        """One image (bytes or a path) -> [S,S,3] uint8 after the eval preset's geometry."""
        return eval_pixels(load_image(source, min_side=self.image_size), self.resize_crop)

    @torch.inference_mode()
    def log_probs(self, sources: Sequence[ImageSource], batch_size: int = 16) -> torch.Tensor:
        """[N,C] log-probabilities for images given as bytes or paths, ``batch_size`` at a
        time; an unreadable image raises :class:`ImageDecodeError`."""
        outs = []
        for i in range(0, len(sources), batch_size):
            pixels = np.stack([self.pixels(s) for s in sources[i : i + batch_size]])
            outs.append(self._forward(pixels))
        return torch.cat(outs) if outs else torch.zeros((0, self.num_classes))

    @torch.inference_mode()
    def log_probs_or_errors(
        self, sources: Sequence[ImageSource | None], batch_size: int = 16
    ) -> tuple[torch.Tensor, list[str | None]]:
        """Like :meth:`log_probs`, but an unreadable image (or a missing one: None) gives an
        error message in its row instead of stopping the batch; its log-probabilities are NaN.

        Decoding runs ahead of the network one batch at a time, so memory stays bounded.
        """
        out = torch.full((len(sources), self.num_classes), float("nan"))
        errors: list[str | None] = [None] * len(sources)
        for start in range(0, len(sources), batch_size):
            rows, pixels = [], []
            for i in range(start, min(start + batch_size, len(sources))):
                if sources[i] is None:
                    errors[i] = "no image: give bytes in column 'image' or a file in 'path'"
                    continue
                try:
                    pixels.append(self.pixels(sources[i]))
                    rows.append(i)
                except ImageDecodeError as exc:
                    errors[i] = str(exc)
            if rows:
                out[rows] = self._forward(np.stack(pixels))
        return out, errors

    @property
    def num_classes(self) -> int:
        return self.net.head[-2].out_features

    def _forward(self, pixels: np.ndarray) -> torch.Tensor:
        """[N,S,S,3] uint8 -> [N,C] log-probabilities on the CPU (uint8 crosses to a GPU)."""
        x = normalize_batch(pixels, self.device)
        feats = extract_features(self.backbone, x, self.precision)
        return self.net.head(feats).float().cpu()


def load_classifier(card: ModelCard, state: dict[str, torch.Tensor],
                    device: torch.device | str = "auto") -> Classifier:
    """A logged model's network, ready on the consumer's ``device`` (``state`` loaded with
    ``map_location="cpu"``, so a model trained on a GPU loads on a CPU-only machine)."""
    return Classifier(card.build_network(state), card.image_size, card.precision, device)
