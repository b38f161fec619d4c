"""Scoring a manifest with a trained network (what ``evaluate`` does), through the feature
cache, without loading the pyfunc or the training code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.compute import Compute
from pipeline.features.extract import Extraction, manifest_features
from pipeline.model.card import ModelCard
from pipeline.model.devices import inference_precision
from pipeline.model.network import FoodNet


def score_manifest(net: FoodNet, card: ModelCard, root: Path, manifest: pd.DataFrame,
                   compute: Compute, cache_dir: Path | None) -> np.ndarray:
    """[N,C] class probabilities of a trained network on a manifest, via the feature cache:
    the logged model's own preprocessing and forward pass on ``compute.device``, at the
    precision the logged model would use there (tested against the pyfunc)."""
    device = torch.device(compute.device)
    how = Extraction.on(compute, device, card.image_size,
                        inference_precision(card.precision, device))
    feats, _ = manifest_features(net.backbone, card.arch, root, manifest, how, cache_dir)
    head = net.head.to(device).eval()
    with torch.inference_mode():
        return head(torch.from_numpy(feats).to(device)).exp().cpu().numpy()
