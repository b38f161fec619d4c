"""The train job: one MLflow run holding every param, per-epoch metrics, the manifests, the
learning curves and a self-contained model with its card."""

import json
from pathlib import Path

import mlflow
import pandas as pd

from pipeline.model.card import ModelCard
from pipeline.model.presets import Preprocessing


def test_train_run_is_fully_logged(champion_store):
    c = champion_store
    out = c.trained
    run = mlflow.get_run(out.run.run_id)
    params, tags = run.data.params, run.data.tags
    assert params["train.lr"] == "0.003" and params["model.weights"] == "none"
    assert params["predict.batch_size"] == "16"  # every param, flattened
    assert params["resolved.weights"].startswith("none (random init")
    assert params["resolved.precision"] in ("fp32", "bf16")
    assert params["resolved.training_path"] == "cached-features"
    for key in ("git_commit", "git_dirty", "params_hash"):
        assert key in tags
    assert tags["params_hash"] == c.params.digest()
    assert out.run.run_name == run.info.run_name

    client = mlflow.MlflowClient()
    for key in ("train_loss", "val_loss", "val_accuracy"):
        history = client.get_metric_history(out.run.run_id, key)
        assert [m.step for m in history] == [1, 2], key  # one point per epoch
        assert [m.value for m in history] == out.history[key].tolist()
    assert out.metrics == {k: out.history[k].iloc[-1]
                           for k in ("train_loss", "val_loss", "val_accuracy")}
    assert list(out.history.columns) == ["epoch", "train_loss", "val_loss", "val_accuracy"]
    steps = client.get_metric_history(out.run.run_id, "train_step_loss")
    assert len(steps) >= 2 and steps[0].step == 1

    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert {"train", "val"} <= set(inputs)  # evaluate adds "test" to the same run
    assert tags["data.train_sha256"] == c.data.train.sha256
    logged = {a.path for a in client.list_artifacts(out.run.run_id, "training")}
    assert {"training/learning_curves.png", "training/feature_cache.json"} <= logged


def test_the_model_card_says_what_was_trained(champion_store, tmp_path):
    c = champion_store
    local = Path(mlflow.artifacts.download_artifacts(c.trained.run.model_uri,
                                                     dst_path=str(tmp_path)))
    card = ModelCard.read(local / "artifacts" / "card.json")
    assert card.classes == c.data.classes
    assert card.image_size == 32 and card.arch == "resnet50"
    assert card.run_id == c.trained.run.run_id
    assert card.preprocessing == Preprocessing.for_size(32)
    assert card.head.hidden == c.params.model.hidden
    assert card.head.feature_norm is c.params.model.feature_norm
    params = mlflow.get_run(c.trained.run.run_id).data.params
    assert card.weights == params["resolved.weights"]
    assert card.precision == params["resolved.precision"]
    raw = json.loads((local / "artifacts" / "card.json").read_text())
    assert "batch_size" not in json.dumps(raw)  # inference batch size is not part of training


def test_history_and_curves_are_returned_for_the_stage(champion_store):
    out = champion_store.trained
    assert isinstance(out.history, pd.DataFrame) and len(out.history) == 2
    assert out.curves.axes  # a matplotlib figure the stage writes as PNG


def test_the_run_and_the_experiment_describe_themselves(champion_store):
    """The run's description says what differs from the committed params.yaml; the
    experiment's says what it is, how to compare runs and where the champion is, and it
    stores the runs-table view that the links open."""
    c = champion_store
    run = mlflow.get_run(c.trained.run.run_id)
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("**What differs from the committed baseline** (`params.yaml` at git")
    assert "| `data.image_size` | 128 | **32** |" in note  # tiny params vs the committed ones
    assert "| `train.lr` |" not in note  # unchanged params are not listed
    assert f"- data: {len(c.data.train.frame)} train / {len(c.data.val.frame)} validation " \
        "images of 4 classes" in note
    exp = mlflow.MlflowClient().get_experiment(run.info.experiment_id)
    text = exp.tags["mlflow.note.content"]
    assert "**Compare runs:**" in text and "**Champion:**" in text
    assert f"[{c.name}](#/models/{c.name}?workflowType=machine_learning)" in text
    view = json.loads(exp.tags["mlflow.sharedViewState.model-training"])
    assert view["selectedColumns"][0] == "metrics.`test_accuracy`"
    assert view["orderByKey"] == "metrics.`test_accuracy`" and view["orderByAsc"] is False
