"""Running a trained network: the CPU precision policy, the BatchNorm-folded backbone that every
extraction runs on, and batch inference from raw images.

Feature extraction over manifests (the cache, ``torch.compile``) builds on these in
``pipeline.features``; the logged model's pyfunc calls :class:`Classifier` directly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.model.errors import ImageDecodeError
from pipeline.model.imaging import ImageSource, load_image
from pipeline.model.network import FoodNet
from pipeline.model.presets import eval_pixels, eval_resize_crop, normalize_batch

log = logging.getLogger(__name__)

# How features are computed, beyond the weights: part of the feature-cache key.
INFERENCE_GRAPH = "fx conv+bn folded, channels_last"


def bf16_supported() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(requested: str) -> str:
    """``auto`` -> bf16 where the CPU supports it natively, else fp32."""
    if requested == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if requested == "bf16" and not bf16_supported():
        log.warning("precision bf16 on a CPU without native bf16: emulated, slower")
    return requested


def autocast(precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the CPU, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def inference_backbone(backbone: nn.Module) -> nn.Module:
    """A frozen copy of ``backbone`` for feature extraction: BatchNorm folded into the
    convolutions (torch.fx) and channels_last memory format.

    Features differ from the eager fp32 backbone by ~1e-6 relative; training, evaluation and
    the logged model all extract through this one function.
    """
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


class Classifier:
    """A trained :class:`FoodNet` run on raw images: decode, eval preset, folded backbone,
    head. ``precision`` is resolved for the machine it runs on."""

    def __init__(self, net: FoodNet, image_size: int, precision: str):
        self.net = net.eval().to(memory_format=torch.channels_last)
        self.image_size = image_size
        self.precision = resolve_precision(precision)
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
        feats = extract_features(self.backbone, normalize_batch(pixels), self.precision)
        return self.net.head(feats)
