from pathlib import Path

import mlflow

from pipeline import tracking
from pipeline.paths import project_root, resolve_user_path


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


def test_train_run_is_fully_logged(trained_run, mlflow_store):
    data, out = trained_run
    run = mlflow.get_run(out.run_id)
    params, tags = run.data.params, run.data.tags
    assert params["train.lr"] == "0.003" and params["model.weights"] == "none"
    assert params["resolved.weights"].startswith("none (random init")
    assert params["resolved.precision"] in ("fp32", "bf16")
    assert params["resolved.training_path"] == "cached-features"
    for key in ("git_commit", "git_dirty", "params_hash"):
        assert key in tags
    assert tags["params_hash"] == data.params.digest()
    client = mlflow.MlflowClient()
    for key in ("train_loss", "val_loss", "val_accuracy"):
        history = client.get_metric_history(out.run_id, key)
        assert [m.step for m in history] == [1, 2], key  # one point per epoch
    steps = client.get_metric_history(out.run_id, "train_step_loss")
    assert len(steps) >= 2 and steps[0].step == 1
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "val"}
    assert tags["data.train_sha256"] == tracking.file_sha256(data.manifests["train"])
    assert out.model_uri.startswith("models:/")
    logged = {a.path for a in client.list_artifacts(out.run_id, "training")}
    assert "training/learning_curves.png" in logged
    model = mlflow.models.get_model_info(out.model_uri)
    assert model.signature.inputs.input_names() == ["image", "path"]
    assert {c.name for c in model.signature.outputs.inputs} == {"label", "confidence", "top5"}
