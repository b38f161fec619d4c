"""The feature cache: keyed by content, weights, preprocessing, device and precision; a head
change reuses it, anything that changes the features misses it."""

import hashlib
import shutil

import numpy as np
import pytest
from helpers import tiny_params

from pipeline.features.cache import FeatureStore, StaleManifestError, cache_key
from pipeline.features.extract import Extraction, compute_features
from pipeline.model.network import state_digest
from pipeline.training import TrainData, TrainJob, train_model


def _misses(result):
    return sum(s["cache_misses"] for s in result.feature_stats.values())


def _train(td, cache, **overrides):
    data = TrainData(td.root, td.classes, td.train, td.val)
    return train_model(TrainJob.from_params(tiny_params(**overrides), data, cache))


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


@pytest.mark.slow  # six extractions; the head-only hit test stays in the fast lane
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


def test_cached_features_equal_fresh_ones(tiny_demo, tmp_path, backbone):
    paths = sorted((tiny_demo / "images").rglob("*.jpg"))[:10]
    key = cache_key("resnet50", state_digest(backbone), 32, "fp32")
    how = Extraction(32, "fp32", batch_size=4, num_workers=0)
    f1, s1 = compute_features(backbone, paths, how, store=FeatureStore(tmp_path, key))
    f2, s2 = compute_features(backbone, paths, how, store=FeatureStore(tmp_path, key))
    fresh, _ = compute_features(backbone, paths, Extraction(32, "fp32", batch_size=3,
                                                            num_workers=0))
    assert s1["cache_misses"] == 10 and s2["cache_hits"] == 10 and s2["cache_misses"] == 0
    assert f1.shape == (10, 2048)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_allclose(fresh, f1, rtol=1e-4, atol=1e-4)
    assert len(list((tmp_path / key).glob("shard-*.npz"))) == 1


def test_extracted_features_are_held_once(tiny_demo, tmp_path, backbone, monkeypatch):
    """At Food-101's size the train+val features are 620 MB: the rows an extraction keeps
    and the cache's shards are one block in memory, not a copy each (three copies made the
    full-size train stage peak at 4.17 GB)."""
    from pipeline.features import extract

    paths = sorted((tiny_demo / "images").rglob("*.jpg"))[:20]
    monkeypatch.setattr(extract, "FLUSH_EVERY", 8)  # several shards, one left pending
    store = FeatureStore(tmp_path, cache_key("resnet50", state_digest(backbone), 32, "fp32"))
    todo = [(f"digest-{i}", p) for i, p in enumerate(paths)]
    how = Extraction(32, "fp32", batch_size=4, num_workers=0, compile="never")  # no probe
    out = extract._extract(backbone, todo, how, store, main=False)
    assert len(out.features) == 20 and len(list(store.dir.glob("shard-*.npz"))) == 3
    for digest, _ in todo:
        assert np.shares_memory(out.features[digest], store.get(digest)), digest
