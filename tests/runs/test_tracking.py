"""Run plumbing: where the store is (also inside DVC experiment workspaces), what a run is
called and tagged with, and runs logged and resumed in a real store."""

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from helpers import tiny_params

from pipeline.handoffs import Manifest
from pipeline.paths import project_root, resolve_user_path
from pipeline.runs import tracking


def test_project_root_inside_dvc_experiment_workspaces(tmp_path):
    repo = tmp_path / "repo"
    temp_ws = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd" / "sub"
    temp_ws.mkdir(parents=True)
    assert project_root(temp_ws) == repo.resolve()
    assert project_root(repo) == repo.resolve()
    assert resolve_user_path("../data", temp_ws) == (tmp_path / "data").resolve()
    assert resolve_user_path("/abs/x", temp_ws) == Path("/abs/x")


def test_default_store_is_absolute_under_the_real_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpxyz"
    ws.mkdir(parents=True)
    monkeypatch.chdir(ws)
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{(tmp_path / 'repo').resolve()}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_run_name_says_what_differs(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    base = {"train.lr": 0.003, "train.epochs": 1, "split.seed": 1, "sample.seed": 1}
    assert tracking.run_name(tracking.describe_changes(base, base)) == "baseline"
    changed = {**base, "train.lr": 0.001, "sample.seed": 2}
    assert tracking.describe_changes(changed, base) == "sample.seed=2 lr=0.001"
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1a2b3")
    assert tracking.run_name("lr=0.001") == "exp-1a2b3: lr=0.001"


def test_run_spec_names_tags_and_params(monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-abc")
    monkeypatch.setattr(tracking, "committed_params", lambda: tiny_params().flat())
    params = tiny_params(train={"lr": 0.01})
    spec = tracking.run_spec(params)
    assert spec.name == "exp-abc: lr=0.01"
    assert spec.experiment == "food101"
    assert spec.params == params.flat()
    assert spec.tags["params_hash"] == params.digest()
    assert spec.tags["dvc_exp_name"] == "exp-abc"
    assert spec.tags["stage"] == "train"


def test_committed_params_are_the_ones_at_git_head():
    flat = tracking.committed_params()
    assert flat is not None and flat["sample.size"] == 10_000


def test_start_resume_and_log(mlflow_store, tmp_path):
    manifest_file = tmp_path / "m.csv"
    Manifest(pd.DataFrame({"path": ["a.jpg"], "label": ["x"], "class_index": [0],
                           "sha256": ["0" * 64]})).write(manifest_file)
    manifest = Manifest.read(manifest_file)
    spec = tracking.RunSpec("tests", "a run", {"stage": "train"}, {"train.lr": 0.1,
                                                                    "sample.classes": ("a",),
                                                                    "data.root": None})
    with tracking.start_run(spec) as run_id:
        tracking.log_manifest(manifest, "train", "training")
        tracking.log_metrics({"val_accuracy": 0.5}, step=1)
        tracking.log_text("a,b\n", "x/table.csv")
    with tracking.resume_run(run_id):
        tracking.set_tags({"promotion": "promoted"})
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "a run"
    assert run.data.params == {"train.lr": "0.1", "sample.classes": '["a"]',
                               "data.root": "null"}
    assert run.data.tags["promotion"] == "promoted"
    assert run.data.tags["data.train_sha256"] == manifest.sha256
    assert run.inputs.dataset_inputs[0].dataset.name == "train"
    with pytest.raises(tracking.TrackingError, match="Re-run `dvc repro -f train`"):
        with tracking.resume_run("0" * 32):
            pass


def test_a_failing_run_is_marked_failed(mlflow_store):
    spec = tracking.RunSpec("tests", "boom", {}, {})
    with pytest.raises(RuntimeError):
        with tracking.start_run(spec) as run_id:
            raise RuntimeError("boom")
    assert mlflow.get_run(run_id).info.status == "FAILED"
