"""The predict job: every unlabeled image labelled by the champion, scored against the key."""

from pathlib import Path

import mlflow
import pytest
from helpers import tiny_params

from pipeline.handoffs import unlabeled_files
from pipeline.jobs.predict import predict_and_log
from pipeline.runs.registry import RegistryError


@pytest.mark.slow  # the model is loaded in a fresh interpreter
def test_predict_labels_every_unlabeled_image(champion_store, tmp_path):
    c = champion_store
    files = unlabeled_files(c.data.unlabeled)
    out, metrics = predict_and_log(files, c.data.key, c.params.registry, c.params.predict,
                                   c.trained.run)
    assert len(files) == c.params.sample.unlabeled_size
    assert out["file"].tolist() == [f.name for f in files]
    assert list(out.columns) == ["file", "label", "confidence", "top5", "error"]
    assert out["error"].isna().all()
    assert set(out["label"]) <= set(c.data.classes)
    assert out["confidence"].between(0, 1).all()

    truth = c.data.key.frame.set_index("file")["label"]
    expected = float((out["label"] == out["file"].map(truth)).mean())
    assert metrics == {"accuracy": pytest.approx(expected), "images": len(files),
                       "errors": 0, "model_version": 1}

    run = mlflow.get_run(c.trained.run.run_id)
    assert run.data.metrics["predict_accuracy"] == pytest.approx(expected)
    assert run.data.tags["predict_model_version"] == "1"
    local = mlflow.MlflowClient().download_artifacts(c.trained.run.run_id,
                                                     "predict/predictions.csv", str(tmp_path))
    import pandas as pd

    assert pd.read_csv(local)["label"].tolist() == out["label"].tolist()


def test_without_champion_nothing_is_logged(champion_store):
    c = champion_store
    params = tiny_params(registry={"model_name": "other"})
    files = unlabeled_files(c.data.unlabeled)
    args = (files, c.data.key, params.registry, params.predict, c.trained.run)
    before = mlflow.get_run(c.trained.run.run_id).data
    with pytest.raises(RegistryError, match="'other' does not exist.*registry is empty"):
        predict_and_log(*args)
    after = mlflow.get_run(c.trained.run.run_id).data
    assert after.tags == before.tags and after.metrics == before.metrics


@pytest.mark.slow  # the model is loaded in a fresh interpreter (once)
def test_the_same_version_on_the_same_files_is_not_loaded_again(champion_store, monkeypatch,
                                                                 tmp_path):
    """A second predict of the same version, files and batch size reads the first one's
    predictions back (the same bytes, no model load); another batch size or a changed file
    runs the model again."""
    import dataclasses
    import shutil

    from pipeline.jobs import predict
    from pipeline.runs import run_model

    c = champion_store
    files = []  # copies: the session's photos stay as they are
    for f in unlabeled_files(c.data.unlabeled):
        files.append(Path(shutil.copy(f, tmp_path / f.name)))
    args = (c.data.key, c.params.registry)
    first, m1 = predict_and_log(files, *args, c.params.predict, c.trained.run)

    calls = []
    real = run_model.predict_files

    def counted(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(run_model, "predict_files", counted)
    again, m2 = predict_and_log(files, *args, c.params.predict, c.trained.run)
    assert not calls
    assert again.to_csv(index=False) == first.to_csv(index=False) and m2 == m1
    assert mlflow.get_run(c.trained.run.run_id).data.tags["predict_reused"] == "true"

    other_batch = dataclasses.replace(c.params.predict, batch_size=c.params.predict.batch_size + 1)
    predict_and_log(files, *args, other_batch, c.trained.run)
    assert len(calls) == 1
    files[0].write_bytes(files[1].read_bytes())  # a changed photo under the same name
    predict_and_log(files, *args, other_batch, c.trained.run)
    assert len(calls) == 2
    assert predict.inputs_digest("models:/x/1", files, 16) != predict.inputs_digest(
        "models:/x/2", files, 16)
