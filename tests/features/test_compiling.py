"""`compute.compile: auto` compiles only where a timed probe and the machine's record say it
pays; every extraction notes what it measured."""

import json
import logging
import sys

import pytest
import torch

import pipeline.features.compiling as compiling
from pipeline.features.compiling import (
    ENVIRONMENTS_KEPT,
    PRIOR_COLD_SECONDS,
    PRIOR_RATIO,
    PRIOR_WARM_FRACTION,
    PROBE_BATCHES,
    PROBE_WARMUP,
    Measured,
    decide,
    load_record,
    machine_key,
    save_record,
)
from pipeline.features.extract import Extraction, compute_features

KEY_ARGS = (torch.device("cpu"), "fp32", 32, 4)  # what _how() below extracts with


@pytest.fixture(autouse=True)
def _own_record(tmp_path, monkeypatch):
    monkeypatch.setenv("FOOD101_COMPILE_RECORD", str(tmp_path / "record.json"))


def test_the_record_lives_in_inductors_cache_folder(tmp_path, monkeypatch):
    """A wiped inductor cache (whose kernels make a compile warm) forgets the costs too."""
    monkeypatch.delenv("FOOD101_COMPILE_RECORD")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert compiling.record_path() == tmp_path / "inductor" / compiling.RECORD_NAME


def _how(**settings):
    return Extraction(32, "fp32", **{"batch_size": 4, "num_workers": 0, **settings})


def _paths(tiny_demo, n):
    return sorted((tiny_demo / "images").rglob("*.jpg"))[:n]


def test_without_measurements_the_priors_decide():
    """A cold compile (the first on the machine) must be paid back by the prior speed-up."""
    cold = PRIOR_COLD_SECONDS["cpu"]
    per_image = 0.01
    enough = int(cold / (per_image * (1 - PRIOR_RATIO))) + 10
    assert decide(enough, per_image, Measured(), "cpu").compile
    assert not decide(enough - 20, per_image, Measured(), "cpu").compile
    warm = decide(enough, per_image, Measured(compiles=1), "cpu")  # compiled once: warm now
    assert warm.cost == pytest.approx(cold * PRIOR_WARM_FRACTION)


def test_measurements_replace_the_priors():
    measured = Measured(eager_per_image=0.004, compiled_per_image=0.003, cold_compile=14.0,
                        warm_compile=3.5, compiles=2)
    d = decide(10_000, 0.004, measured, "cpu")  # saves 10,000 x 1 ms = 10 s against 3.5 s
    assert d.compile and d.saving == pytest.approx(10.0) and d.cost == 3.5
    assert "measured" in d.why and "warm" in d.why
    assert not decide(3_000, 0.004, measured, "cpu").compile  # 3 s against 3.5 s
    # no faster when compiled (as measured): never worth it
    assert not decide(10**7, 0.004, Measured(0.004, 0.0041, 1.0, 1.0, 2), "cpu").compile
    # a ratio timed within one extraction wins over figures from two runs (another load)
    both = Measured(0.004, 0.001, 14.0, 3.5, 2, ratio=0.75)
    assert decide(10_000, 0.004, both, "cpu").saving == pytest.approx(10.0)
    assert "x0.75 measured" in decide(10_000, 0.004, both, "cpu").why


def test_a_new_python_environment_is_costed_apart_and_leaves_the_warm_cost_alone(tmp_path):
    """Inductor builds its kernels again in every venv: that first compile is noted apart,
    so it neither passes for a warm one nor is taken for one elsewhere."""
    m = Measured()
    m.note_compile(14.0, "/venv-a")  # the cache's first: cold
    m.note_compile(9.0, "/venv-b")  # the first in venv b
    assert (m.cold_compile, m.warm_compile, m.new_environment_compile) == (14.0, None, 9.0)
    m.note_compile(3.5, "/venv-b")  # b again: warm
    m.note_compile(8.0, "/venv-c")
    assert (m.warm_compile, m.new_environment_compile, m.compiles) == (3.5, 8.0, 4)
    assert m.environments == ["/venv-a", "/venv-b", "/venv-c"]
    m.note_compile(3.4, "/venv-a")  # a again: warm, and now the latest
    assert m.environments == ["/venv-b", "/venv-c", "/venv-a"] and m.warm_compile == 3.4

    here = decide(10_000, 0.004, m, "cpu", env="/venv-b")
    assert here.cost == 3.4 and here.why.endswith("(warm, measured)")
    new = decide(10_000, 0.004, m, "cpu", env="/venv-d")
    assert new.cost == 8.0 and new.why.endswith("(measured; the first in this Python "
                                                 "environment)")
    path = tmp_path / "record.json"
    save_record(path, "k", m)
    assert load_record(path, "k") == m
    # a record from before environments were kept: its compiles count as warm anywhere
    old = Measured(0.004, 0.003, 14.0, 3.5, 2)
    assert decide(10_000, 0.004, old, "cpu", env="/venv-d").why.endswith("(warm, measured)")
    old.note_compile(9.0, "/venv-d")
    assert old.warm_compile == 9.0 and old.environments == ["/venv-d"]
    # without a timed first compile elsewhere, a new one is costed as warm, and says so
    fresh = Measured(cold_compile=14.0, warm_compile=3.5, compiles=2, environments=["/a"])
    assert decide(10_000, 0.004, fresh, "cpu", env="/b").why.endswith(
        "(warm, measured; the first in this Python environment)")


def test_the_record_remembers_the_latest_environments():
    m = Measured(compiles=1)
    for i in range(ENVIRONMENTS_KEPT + 5):
        m.note_compile(1.0, f"/venv-{i}")
    assert len(m.environments) == ENVIRONMENTS_KEPT
    assert m.environments[-1] == f"/venv-{ENVIRONMENTS_KEPT + 4}"


def test_the_record_round_trips_and_survives_garbage(tmp_path):
    path = tmp_path / "r.json"
    assert load_record(path, "k") == Measured()  # none yet
    save_record(path, "k", Measured(0.004, 0.003, 14.0, None, 1))
    save_record(path, "other", Measured(compiles=3))
    assert load_record(path, "k") == Measured(0.004, 0.003, 14.0, None, 1)
    assert load_record(path, "other").compiles == 3
    path.write_text("{not json")
    assert load_record(path, "k") == Measured()  # unreadable: the priors stand in
    save_record(path, "k", Measured(compiles=1))  # and it is written anew
    assert json.loads(path.read_text())["k"]["compiles"] == 1


class _Shifted(torch.nn.Module):
    """A stand-in for the compiled graph (compiling takes seconds) whose features are told
    apart from the eager ones: the eager features + 1."""

    def __init__(self, fused):
        super().__init__()
        self.fused = fused

    def forward(self, x):
        return self.fused(x) + 1.0


def _fake_compile(calls):
    def compiled_backbone(fused, *args, **kwargs):
        calls.append(args)
        return _Shifted(fused)

    return compiled_backbone


def _record(measured: Measured) -> None:
    save_record(compiling.record_path(), machine_key(*KEY_ARGS), measured)


def test_auto_probes_eagerly_then_compiles_when_the_record_says_it_pays(
        tiny_demo, backbone, monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(compiling, "compiled_backbone", _fake_compile(calls))
    # measured earlier on this machine: compiled runs 10x faster, a warm compile is instant
    _record(Measured(eager_per_image=1.0, compiled_per_image=0.1, cold_compile=1e-6,
                     warm_compile=1e-6, compiles=1))
    with caplog.at_level(logging.INFO, logger="pipeline.features.compiling"):
        feats, stats = compute_features(backbone, _paths(tiny_demo, 42), _how(compile="auto"))
    assert len(calls) == 1 and stats["compiled"]
    # it decided after the untimed warm-up batches and the timed ones, not before
    assert f"the probe's {(PROBE_WARMUP + PROBE_BATCHES) * 4} images" in caplog.text
    assert stats["compile_decision"].startswith("compiled: compiling would save")
    after = load_record(compiling.record_path(), machine_key(*KEY_ARGS))
    assert after.compiles == 2 and after.compiled_per_image not in (None, 0.1)  # re-measured
    assert after.eager_per_image not in (None, 1.0)
    assert after.ratio == pytest.approx(after.compiled_per_image / after.eager_per_image)
    # every feature, the probe's batches included, comes from the compiled graph (eager + 1
    # here); the last batch of 2 was padded to its static batch of 4
    eager, _ = compute_features(backbone, _paths(tiny_demo, 42), _how(compile="never"))
    torch.testing.assert_close(torch.from_numpy(feats), torch.from_numpy(eager) + 1.0)


def test_auto_stays_eager_when_compiling_costs_more_than_it_saves(
        tiny_demo, backbone, monkeypatch):
    calls = []
    monkeypatch.setattr(compiling, "compiled_backbone", _fake_compile(calls))
    _record(Measured(eager_per_image=1.0, compiled_per_image=0.9, cold_compile=1e6,
                     warm_compile=1e6, compiles=1))
    feats, stats = compute_features(backbone, _paths(tiny_demo, 40), _how(compile="auto"))
    assert calls == [] and not stats["compiled"]
    assert stats["compile_decision"].startswith("eager: compiling would save")
    after = load_record(compiling.record_path(), machine_key(*KEY_ARGS))
    assert after.compiles == 1 and after.eager_per_image != 1.0  # the probe's measurement
    eager, _ = compute_features(backbone, _paths(tiny_demo, 40), _how(compile="never"))
    torch.testing.assert_close(torch.from_numpy(feats), torch.from_numpy(eager))


def test_the_cache_keeps_the_compiled_features_of_the_probe(tiny_demo, backbone, monkeypatch,
                                                             tmp_path):
    """Nothing reaches the cache while probing: the probe's eager features, computed again
    by the compiled graph, are replaced before they are kept."""
    from pipeline.features import extract
    from pipeline.features.cache import FeatureStore, cache_key
    from pipeline.model.network import state_digest

    monkeypatch.setattr(extract, "FLUSH_EVERY", 4)  # a shard a batch, were it not probing
    monkeypatch.setattr(compiling, "compiled_backbone", _fake_compile([]))
    _record(Measured(1.0, 0.1, 1e-6, 1e-6, 1))
    store = FeatureStore(tmp_path, cache_key("resnet50", state_digest(backbone), 32, "fp32"))
    paths = _paths(tiny_demo, 42)
    feats, stats = compute_features(backbone, paths, _how(compile="auto"), store=store)
    assert stats["compiled"]
    eager, _ = compute_features(backbone, paths, _how(compile="never"))
    torch.testing.assert_close(torch.from_numpy(feats), torch.from_numpy(eager) + 1.0)
    again, hits = compute_features(backbone, paths, _how(compile="never"), store=store)
    assert hits["cache_hits"] == 42
    torch.testing.assert_close(torch.from_numpy(again), torch.from_numpy(feats))


def test_auto_does_not_probe_what_the_probe_would_cover(tiny_demo, backbone, monkeypatch):
    calls = []
    monkeypatch.setattr(compiling, "compiled_backbone", _fake_compile(calls))
    _record(Measured(1.0, 0.1, 1e-6, 1e-6, 1))  # it would pay, were there images left
    n = (PROBE_WARMUP + PROBE_BATCHES) * 4
    _, stats = compute_features(backbone, _paths(tiny_demo, n), _how(compile="auto"))
    assert calls == [] and "no more than the probe" in stats["compile_decision"]


def test_always_compiles_first_and_notes_a_cold_then_a_warm_compile(
        tiny_demo, backbone, monkeypatch):
    calls = []
    monkeypatch.setattr(compiling, "compiled_backbone", _fake_compile(calls))
    for _ in range(2):
        _, stats = compute_features(backbone, _paths(tiny_demo, 8), _how(compile="always"))
        assert stats["compiled"] and stats["compile_decision"] == "compute.compile=always"
    after = load_record(compiling.record_path(), machine_key(*KEY_ARGS))
    assert len(calls) == 2 and after.compiles == 2
    assert after.cold_compile is not None and after.warm_compile is not None
    assert after.environments == [sys.prefix]  # both in this interpreter's environment
