"""Feature extraction: the content-keyed cache, the compile policy, scoring a manifest."""

import hashlib
import logging
import shutil

import numpy as np
import pytest
import torch
from helpers import tiny_params

from pipeline.features import (
    FeatureStore,
    StaleManifestError,
    cache_key,
    compute_features,
    score_manifest,
)
from pipeline.model.card import ModelCard
from pipeline.model.network import HeadSpec, build_model, state_digest
from pipeline.model.presets import Preprocessing
from pipeline.model.weights import build_backbone
from pipeline.training import train_model


def _misses(result):
    return sum(s["cache_misses"] for s in result.feature_stats.values())


def _train(td, cache, **overrides):
    p = tiny_params(**overrides)
    return train_model(td.root, td.train.frame, td.val.frame, list(td.classes), p.model,
                       p.train, p.data.image_size, cache)


def test_head_only_change_hits_the_cache(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    first = _train(tiny_data, cache)
    n = len(tiny_data.train.frame) + len(tiny_data.val.frame)
    assert _misses(first) == n
    second = _train(tiny_data, cache, train={"lr": 0.01, "epochs": 3, "batch_size": 8},
                    model={"hidden": 32, "dropout": 0.5})
    assert _misses(second) == 0
    assert second.feature_stats["train+val"]["cache_hits"] == n
    again = _train(tiny_data, cache)  # same params: the same numbers from cached features
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert [h[key] for h in again.history] == [h[key] for h in first.history], key


def test_preprocessing_weights_or_image_change_miss(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    fp32 = {"precision": "fp32"}  # explicit: `auto` is bf16 on CPUs with native bf16
    _train(tiny_data, cache, train=fp32)
    n = len(tiny_data.train.frame) + len(tiny_data.val.frame)
    assert _misses(_train(tiny_data, cache, data={"image_size": 40}, train=fp32)) == n
    assert _misses(_train(tiny_data, cache, model={"init_seed": 1}, train=fp32)) == n
    assert _misses(_train(tiny_data, cache, train={"precision": "bf16"})) == n
    assert _misses(_train(tiny_data, cache, train=fp32)) == 0
    # Change the bytes of one training image (copy the folder so the fixture stays intact).
    root = tmp_path / "copy"
    shutil.copytree(tiny_data.root, root)
    victim = root / tiny_data.train.frame["path"].iloc[0]
    from PIL import Image

    Image.open(victim).rotate(90).save(victim, "JPEG")
    tiny_data.root = root
    # The manifest still records the old bytes: the run stops and says what to do ...
    with pytest.raises(StaleManifestError, match="changed after `sample` listed it"):
        _train(tiny_data, cache)
    # ... and once `sample` has recorded the new bytes, only that image is recomputed.
    train = tiny_data.train.frame.copy()
    train.loc[0, "sha256"] = hashlib.sha256(victim.read_bytes()).hexdigest()
    tiny_data.train = type(tiny_data.train)(train)
    assert _misses(_train(tiny_data, cache)) == 1


def test_cached_features_equal_fresh_ones(tiny_demo, tmp_path):
    backbone, _ = build_backbone("resnet50", "none", 0)
    paths = sorted((tiny_demo / "images").rglob("*.jpg"))[:10]
    key = cache_key("resnet50", state_digest(backbone), 32, "fp32")
    store = FeatureStore(tmp_path, key)
    f1, s1 = compute_features(backbone, paths, store=store, image_size=32, precision="fp32",
                              batch_size=4, num_workers=0)
    f2, s2 = compute_features(backbone, paths, store=FeatureStore(tmp_path, key), image_size=32,
                              precision="fp32", batch_size=4, num_workers=0)
    fresh, _ = compute_features(backbone, paths, store=None, image_size=32, precision="fp32",
                                batch_size=3, num_workers=0)
    assert s1["cache_misses"] == 10 and s2["cache_hits"] == 10 and s2["cache_misses"] == 0
    assert f1.shape == (10, 2048)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_allclose(fresh, f1, rtol=1e-4, atol=1e-4)
    assert len(list((tmp_path / key).glob("shard-*.npz"))) == 1


def _paths(tiny_demo, n=6):
    return sorted((tiny_demo / "images").rglob("*.jpg"))[:n]


@pytest.mark.slow
def test_compiled_extraction_matches_eager(tiny_demo):
    """torch.compile changes how features are computed, not what they are (the cache key
    does not include it); the last, partial batch is padded to the compiled batch size."""
    backbone, _ = build_backbone("resnet50", "none", 0)
    args = dict(store=None, image_size=32, precision="fp32", batch_size=4, num_workers=0)
    eager, s_eager = compute_features(backbone, _paths(tiny_demo), compile="never", **args)
    compiled, s_comp = compute_features(backbone, _paths(tiny_demo), compile="always", **args)
    assert not s_eager["compiled"] and s_comp["compiled"]
    assert compiled.shape == (6, 2048)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)


def test_decoding_workers_give_the_same_features(tiny_demo):
    backbone, _ = build_backbone("resnet50", "none", 0)
    args = dict(store=None, image_size=32, precision="fp32", batch_size=4, compile="never")
    inline, _ = compute_features(backbone, _paths(tiny_demo), num_workers=0, **args)
    workers, _ = compute_features(backbone, _paths(tiny_demo), num_workers=2, **args)
    np.testing.assert_array_equal(workers, inline)


def test_compile_failure_falls_back_to_eager(tiny_demo, monkeypatch, caplog):
    def broken(*_, **__):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    backbone, _ = build_backbone("resnet50", "none", 0)
    args = dict(store=None, image_size=32, precision="fp32", batch_size=4, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.features"):
        feats, stats = compute_features(backbone, _paths(tiny_demo), compile="always", **args)
    assert not stats["compiled"] and "torch.compile failed" in caplog.text
    eager, _ = compute_features(backbone, _paths(tiny_demo), compile="never", **args)
    np.testing.assert_array_equal(feats, eager)


def test_score_manifest_is_the_network_on_the_eval_preset(tiny_data, tmp_path):
    """What evaluate reports: the trained network's probabilities for each manifest row, the
    same from the cache as computed fresh, and the eager network's answer."""
    backbone, _ = build_backbone("resnet50", "none", 0)
    torch.manual_seed(0)
    net = build_model("resnet50", 4, HeadSpec(hidden=8), backbone).eval()
    card = ModelCard(arch="resnet50", classes=tuple(tiny_data.classes), image_size=32,
                     head=HeadSpec(hidden=8), weights="none", precision="fp32",
                     preprocessing=Preprocessing.for_size(32), run_id="r")
    test = tiny_data.test.frame
    args = dict(batch_size=4, num_workers=0)
    fresh = score_manifest(net, card, tiny_data.root, test, cache_dir=None, **args)
    cached = score_manifest(net, card, tiny_data.root, test, cache_dir=tmp_path, **args)
    again = score_manifest(net, card, tiny_data.root, test, cache_dir=tmp_path, **args)
    assert fresh.shape == (len(test), 4)
    np.testing.assert_allclose(fresh.sum(1), 1, rtol=1e-5)
    np.testing.assert_array_equal(cached, again)
    np.testing.assert_allclose(cached, fresh, rtol=1e-5, atol=1e-6)

    from pipeline.model.imaging import load_image
    from pipeline.model.presets import eval_transform

    x = torch.stack([eval_transform(32)(load_image(tiny_data.root / p, min_side=32))
                     for p in test["path"]])
    with torch.inference_mode():
        eager = net(x).exp().numpy()
    np.testing.assert_allclose(fresh, eager, rtol=1e-3, atol=1e-4)
