"""Scoring a manifest: what evaluate reports is the trained network on the eval preset."""

import numpy as np
import pytest
import torch

from pipeline.compute import resolve_compute
from pipeline.config import ComputeConfig
from pipeline.features.scoring import score_manifest
from pipeline.model.card import ModelCard
from pipeline.model.imaging import load_image
from pipeline.model.network import HeadSpec, build_model
from pipeline.model.presets import Preprocessing, eval_pixels, eval_resize_crop, normalize_batch


def test_score_manifest_is_the_network_on_the_eval_preset(tiny_data, tmp_path, backbone,
                                                          monkeypatch):
    """What evaluate reports: the trained network's probabilities for each manifest row, the
    same from the cache as computed fresh, and the eager network's answer; with every
    feature cached, no backbone is built (a head-only experiment's evaluate)."""
    torch.manual_seed(0)
    net = build_model("resnet50", 4, HeadSpec(hidden=8), backbone).eval()
    card = ModelCard(arch="resnet50", classes=tuple(tiny_data.classes), image_size=32,
                     head=HeadSpec(hidden=8), weights="none", precision="fp32",
                     preprocessing=Preprocessing.for_size(32), run_id="r")
    test = tiny_data.test.frame
    compute = resolve_compute(ComputeConfig(device="cpu", num_workers=0, feature_batch_size=4))
    fresh = score_manifest(card, net.state_dict(), tiny_data.root, test, compute, None)
    cached = score_manifest(card, net.state_dict(), tiny_data.root, test, compute, tmp_path)

    def no_backbone(*_):
        raise AssertionError("a backbone was built")

    monkeypatch.setattr(ModelCard, "build_network", no_backbone)
    again = score_manifest(card, net.state_dict(), tiny_data.root, test, compute, tmp_path)
    with pytest.raises(AssertionError, match="a backbone was built"):  # a miss builds one
        score_manifest(card, net.state_dict(), tiny_data.root, test, compute, tmp_path / "x")
    monkeypatch.undo()
    assert fresh.shape == (len(test), 4)
    np.testing.assert_allclose(fresh.sum(1), 1, rtol=1e-5)
    np.testing.assert_array_equal(cached, again)
    np.testing.assert_allclose(cached, fresh, rtol=1e-5, atol=1e-6)

    x = normalize_batch(np.stack([eval_pixels(load_image(tiny_data.root / p, min_side=32),
                                              eval_resize_crop(32)) for p in test["path"]]))
    with torch.inference_mode():
        eager = net(x).exp().numpy()
    np.testing.assert_allclose(fresh, eager, rtol=1e-3, atol=1e-4)
