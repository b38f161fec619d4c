"""What a new run is: its name says what differs from the committed params.yaml, its tags
carry git state and the DVC experiment, and the difference is computed once per run."""

from helpers import tiny_params

from pipeline.runs import spec
from pipeline.runs.spec import Baseline


def test_param_changes_are_every_key_that_differs_sorted():
    base = {"train.lr": 0.003, "sample.classes": "all", "train.epochs": 1}
    now = {**base, "train.lr": 0.01, "sample.classes": ["a|b", "c"], "model.new": 1}
    assert spec.param_changes(now, base) == [
        ("model.new", None, 1), ("sample.classes", "all", ["a|b", "c"]),
        ("train.lr", 0.003, 0.01)]
    assert spec.param_changes(base, base) == []


def test_run_name_says_what_differs(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    base = {"train.lr": 0.003, "train.epochs": 1, "split.seed": 1, "sample.seed": 1}
    assert spec.run_name(spec.param_changes(base, base), base) == "baseline"
    assert spec.run_name(None, base) == "baseline"  # committed params unreadable
    changed = {**base, "train.lr": 0.001, "sample.seed": 2}
    # a leaf that two params share keeps its section
    assert spec.run_name(spec.param_changes(changed, base), changed) == "sample.seed=2 lr=0.001"
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1a2b3")
    assert spec.run_name([("train.lr", 0.003, 0.001)], changed) == "exp-1a2b3: lr=0.001"


def test_run_spec_names_tags_and_params(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    monkeypatch.setattr(spec, "committed_params", lambda: tiny_params().flat())
    params = tiny_params(train={"lr": 0.01}, registry={"model_name": "dishes"})
    run = spec.run_spec(params)
    assert run.name == "exp-abc: model_name=dishes lr=0.01"  # sorted by the full key
    assert run.experiment == "food101"
    assert run.model_name == "dishes"  # typed, not read back from the flat params
    assert run.params == params.flat()
    assert run.baseline.changes == (("registry.model_name", "food101-resnet50", "dishes"),
                                    ("train.lr", 0.003, 0.01))
    assert run.tags["params_hash"] == params.digest()
    assert run.tags["dvc_exp_name"] == "exp-abc"
    assert run.tags["stage"] == "train"


def test_the_committed_params_are_read_once_per_run(monkeypatch):
    calls = []
    real = spec._git

    def counting(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(spec, "_git", counting)
    run = spec.run_spec(tiny_params())
    assert calls.count("show") == 1 and len(calls) == 3  # show, rev-parse, status
    assert run.baseline.commit == run.tags["git_commit"] != "unknown"


def test_committed_params_are_the_ones_at_git_head():
    flat = spec.committed_params()
    assert flat is not None and flat["sample.size"] == 10_000


def test_git_tags_outside_a_repository(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.delenv("DVC_EXP_BASELINE_REV", raising=False)
    tags = spec.git_tags(Baseline(commit=None, dirty=None, changes=None))
    assert tags == {"git_commit": "unknown", "git_dirty": "unknown",
                    "mlflow.source.git.commit": "unknown"}
    assert spec.git_tags(Baseline("abc", True, ()))["git_dirty"] == "true"
