"""Run plumbing: where the store is (also inside DVC experiment workspaces), what a run is
called and tagged with, and runs logged and resumed in a real store."""

import json
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


def test_ui_routes_open_model_training_mode():
    assert tracking.runs_route("3") == ("#/experiments/3/runs?workflowType=machine_learning"
                                        "&viewStateShareKey=model-training")
    assert tracking.runs_route("3", view=False) == \
        "#/experiments/3/runs?workflowType=machine_learning"
    assert tracking.run_route("3", "abc") == \
        "#/experiments/3/runs/abc?workflowType=machine_learning"
    assert tracking.model_route("food101 resnet") == \
        "#/models/food101%20resnet?workflowType=machine_learning"
    assert tracking.version_route("m", "2") == "#/models/m/versions/2?workflowType=machine_learning"
    assert tracking.compare_route("3", ["a", "b"]) == (
        "#/compare-runs?runs=%5B%22a%22%2C%20%22b%22%5D&experiments=%5B%223%22%5D"
        "&workflowType=machine_learning")


def test_runs_page_uses_the_stored_view_once_the_experiment_has_it(mlflow_store):
    assert tracking.runs_page("nowhere") is None
    exp_id = tracking.ensure_experiment("ui")
    assert tracking.runs_page("ui") == tracking.runs_route(exp_id, view=False)
    tracking.describe_experiment(exp_id, "a-model")
    assert tracking.runs_page("ui") == tracking.runs_route(exp_id)
    tags = mlflow.MlflowClient().get_experiment(exp_id).tags
    assert json.loads(tags[tracking.VIEW_TAG]) == tracking.runs_view_state()
    assert tracking.runs_route(exp_id) in tags[tracking.NOTE]  # "Compare runs" links the view


def test_run_note_lists_what_differs_from_the_committed_baseline():
    base = {"train.lr": 0.003, "sample.classes": "all", "train.epochs": 1}
    now = {**base, "train.lr": 0.01, "sample.classes": ["a|b", "c"], "model.new": 1}
    assert tracking.baseline_diff(now, base) == [
        ("model.new", None, 1), ("sample.classes", "all", ["a|b", "c"]),
        ("train.lr", 0.003, 0.01)]
    note = tracking.run_note(now, base, {"data": "4 images"})
    assert "| `train.lr` | 0.003 | **0.01** |" in note
    assert '| `sample.classes` | all | **["a\\|b", "c"]** |' in note  # a pipe cannot split a cell
    assert note.endswith("\n\n- data: 4 images")
    assert "no param differs" in tracking.run_note(base, base, {})
    assert "unknown" in tracking.run_note(base, None, {})


def test_run_note_sections_are_replaced_not_repeated(mlflow_store):
    with tracking.start_run(tracking.RunSpec("tests", "notes", {}, {})) as run_id:
        tracking.set_run_note("head")
        tracking.set_run_note_section("Evaluation", "first")
        tracking.set_run_note_section("Predict", "p")
        tracking.set_run_note_section("Evaluation", "second")
    note = mlflow.get_run(run_id).data.tags[tracking.NOTE]
    assert note == "head\n\n### Predict\np\n\n### Evaluation\nsecond"
