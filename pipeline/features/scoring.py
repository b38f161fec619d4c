"""Scoring a manifest with a trained network (what ``evaluate`` does), through the feature
cache, without loading the pyfunc or the training code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.compute import Compute
from pipeline.features.extract import Extraction, LazyBackbone, manifest_features
from pipeline.model.card import ModelCard
from pipeline.model.devices import inference_precision
from pipeline.model.network import backbone_digest


def score_manifest(card: ModelCard, state: dict[str, torch.Tensor], root: Path,
                   manifest: pd.DataFrame, compute: Compute, cache_dir: Path | None
                   ) -> np.ndarray:
    """[N,C] class probabilities of a trained network (its card and state dict) on a
    manifest, via the feature cache: the logged model's own preprocessing and forward pass on
    ``compute.device``, at the precision the logged model would use there (tested against the
    pyfunc). The backbone is built only if an image misses the cache."""
    device = torch.device(compute.device)
    how = Extraction.on(compute, device, card.image_size,
                        inference_precision(card.precision, device))
    backbone = LazyBackbone(backbone_digest(state), lambda: card.build_network(state).backbone)
    feats, _ = manifest_features(backbone, card.arch, root, manifest, how, cache_dir)
    head = card.build_head(state).to(device)
    with torch.inference_mode():
        return head(torch.from_numpy(feats).to(device)).exp().cpu().numpy()
