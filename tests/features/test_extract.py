"""Extraction on a device: the compile policy and decoding workers change the speed, not the
features."""

import logging

import numpy as np
import pytest
import torch

from pipeline.features.extract import Extraction, compute_features


def _paths(tiny_demo, n=6):
    return sorted((tiny_demo / "images").rglob("*.jpg"))[:n]


def _how(**settings):
    return Extraction(32, "fp32", **{"batch_size": 4, "num_workers": 0, **settings})


@pytest.mark.slow
def test_compiled_extraction_matches_eager(tiny_demo, backbone):
    """torch.compile changes how features are computed, not what they are (the cache key
    does not include it); the last, partial batch is padded to the compiled batch size."""
    eager, s_eager = compute_features(backbone, _paths(tiny_demo), _how(compile="never"))
    compiled, s_comp = compute_features(backbone, _paths(tiny_demo), _how(compile="always"))
    assert not s_eager["compiled"] and s_comp["compiled"]
    assert compiled.shape == (6, 2048)
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-5)


def test_decoding_workers_give_the_same_features(tiny_demo, backbone):
    inline, _ = compute_features(backbone, _paths(tiny_demo), _how(compile="never"))
    workers, _ = compute_features(backbone, _paths(tiny_demo),
                                  _how(compile="never", num_workers=2))
    np.testing.assert_array_equal(workers, inline)


def test_compile_failure_falls_back_to_eager(tiny_demo, monkeypatch, caplog, backbone):
    def broken(*_, **__):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    with caplog.at_level(logging.WARNING, logger="pipeline.features.extract"):
        feats, stats = compute_features(backbone, _paths(tiny_demo), _how(compile="always"))
    assert not stats["compiled"] and "torch.compile failed" in caplog.text
    assert stats["compile_decision"] == "compute.compile=always (compiling failed: eager)"
    eager, _ = compute_features(backbone, _paths(tiny_demo), _how(compile="never"))
    np.testing.assert_array_equal(feats, eager)


def test_forward_seconds_are_a_part_of_the_loop(tiny_demo, backbone, monkeypatch):
    """The stats split the loop into forward passes and the rest (decoding): `make bench`
    counts only the first as the network's work."""
    import pipeline.features.compiling as compiling

    real = compiling.extract_features
    monkeypatch.setattr(compiling, "extract_features",
                        lambda *a: (__import__("time").sleep(0.2), real(*a))[1])
    _, stats = compute_features(backbone, _paths(tiny_demo), _how(compile="never"))
    assert stats["forward_seconds"] >= 2 * 0.2  # two batches of 4 and 2
    assert stats["forward_seconds"] <= stats["extract_seconds"]
