"""The evaluate job: test metrics against the true labels, artifacts in the training run, a
new registry version and the gate's decision."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from helpers import log_legacy_model

from pipeline.jobs.evaluate import labels_accuracy
from pipeline.runs import registry


def test_metrics_are_against_the_true_labels(champion_store):
    c = champion_store
    ev = c.evaluated
    test = c.data.test.frame
    assert set(ev.metrics) == {"test_accuracy", "test_top5_accuracy", "test_macro_f1"}
    assert len(ev.confusion) == len(test)
    assert ev.confusion["actual"].tolist() == test["label"].tolist()
    acc = float((ev.confusion["actual"] == ev.confusion["predicted"]).mean())
    assert ev.metrics["test_accuracy"] == pytest.approx(acc)
    assert ev.metrics["test_top5_accuracy"] >= ev.metrics["test_accuracy"]
    assert ev.per_class["class"].tolist() == list(c.data.classes)
    assert ev.per_class["support"].sum() == len(test)
    # per-class accuracy (the bar chart's data): each class's recall, worst first
    recall = dict(zip(ev.per_class["class"], ev.per_class["recall"], strict=True))
    assert sorted(ev.accuracy["class"]) == sorted(c.data.classes)
    assert ev.accuracy["accuracy"].is_monotonic_increasing
    for row in ev.accuracy.itertuples():
        assert row.accuracy == pytest.approx(recall[row._1], abs=1e-4)
    figs = ev.figures
    assert [t.get_text() for t in figs.confusion.axes[0].get_xticklabels()] == list(c.data.classes)
    assert [t.get_text() for t in figs.per_class.axes[0].get_yticklabels()] == \
        ev.accuracy["class"].tolist()
    captions = [ax.get_title() for ax in figs.worst.axes if ax.get_title()]
    assert len(captions) == min(16, len(test))  # the grid of the worst-classified images
    assert all(t.startswith("true: ") and "\npred: " in t for t in captions)


def test_the_training_run_holds_the_evaluation(champion_store, tmp_path):
    c = champion_store
    ev, run_id = c.evaluated, c.trained.run.run_id
    run = mlflow.get_run(run_id)
    for key, value in ev.metrics.items():
        assert run.data.metrics[key] == pytest.approx(value)
    assert run.data.tags["registered_version"] == "1"
    assert run.data.tags["promotion"] == "promoted"
    assert run.data.tags["data.test_sha256"] == c.data.test.sha256
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/per_class_report.csv",
            "evaluation/confusion_matrix.csv", "evaluation/promotion.json",
            "evaluation/per_class_accuracy.png", "evaluation/worst_predictions.png"} <= artifacts
    pictures = {a.path for folder in ("training", "evaluation")
                for a in client.list_artifacts(run_id, folder) if a.path.endswith(".png")}
    assert pictures == {"training/learning_curves.png", "evaluation/confusion_matrix.png",
                        "evaluation/per_class_accuracy.png", "evaluation/worst_predictions.png"}
    # each picture is rendered once: the run holds the bytes the stage writes to plots/
    for name, png in ev.pngs.items():
        local = client.download_artifacts(run_id, f"evaluation/{name}.png", str(tmp_path))
        assert Path(local).read_bytes() == png and png.startswith(b"\x89PNG")
    local = client.download_artifacts(run_id, "training/learning_curves.png", str(tmp_path))
    assert Path(local).read_bytes() == c.trained.curves_png
    local = Path(client.download_artifacts(run_id, "evaluation", str(tmp_path)))
    assert (local / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pd.read_csv(local / "per_class_report.csv")["class"].tolist() == list(c.data.classes)
    cm = pd.read_csv(local / "confusion_matrix.csv", index_col=0)
    assert cm.values.sum() == len(c.data.test.frame)
    assert json.loads((local / "promotion.json").read_text()) == ev.decision.as_dict()


def test_registered_as_the_first_champion(champion_store):
    c = champion_store
    d = c.evaluated.decision
    assert (d.promoted, d.reason, d.version, d.run_id) == (
        True, "no champion yet", "1", c.trained.run.run_id)
    assert d.test_manifest_sha256 == c.data.test.sha256
    assert registry.resolve(c.name, "champion").version == "1"
    mv = registry.get_version(c.name, 1)
    assert mv.run_id == c.trained.run.run_id
    assert mv.tags["test_accuracy"] == f"{c.evaluated.metrics['test_accuracy']:.6f}"
    assert mv.tags["test_manifest_sha256"] == c.data.test.sha256
    assert mv.tags["promotion"] == "promoted"


def test_descriptions_of_the_run_the_version_and_the_model(champion_store):
    """What people read in the UI: MLflow's own description fields, not only tags."""
    c = champion_store
    run_id, metrics = c.trained.run.run_id, c.evaluated.metrics
    run = mlflow.get_run(run_id)
    note = run.data.tags["mlflow.note.content"]
    evaluation = note.split("### Evaluation and promotion\n")[1]
    assert f"[{c.name} v1](#/models/{c.name}/versions/1?workflowType=machine_learning)" \
        in evaluation
    assert "**promoted to champion** (no champion yet)" in evaluation
    assert f"test_accuracy **{metrics['test_accuracy']:.4f}**" in evaluation
    assert note.startswith("**What differs from the committed baseline**")  # train's part kept

    mv = registry.get_version(c.name, 1)
    exp_id = run.info.experiment_id
    assert mv.description.startswith(f"test_accuracy {metrics['test_accuracy']:.4f} · "
                                     f"test_top5_accuracy {metrics['test_top5_accuracy']:.4f} · "
                                     f"test_macro_f1 {metrics['test_macro_f1']:.4f}")
    assert f"`{c.data.test.path}` ({len(c.data.test.frame)} images" in mv.description
    assert c.data.test.sha256[:12] in mv.description
    link = f"(#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning)"
    assert f"Run [{c.trained.run.run_name}]{link}" in mv.description
    assert "**promoted to champion**: no champion yet." in mv.description
    model = mlflow.MlflowClient().get_registered_model(c.name)
    assert f"models:/{c.name}@champion" in model.description


def test_labels_accuracy_compares_with_the_truth():
    assert labels_accuracy(["a", "b", "c"], ["a", "b", "x"]) == pytest.approx(2 / 3)
    assert labels_accuracy(["a", "a"], ["b", "b"]) == 0.0
    assert labels_accuracy([], []) == 0.0


def test_a_champion_of_other_classes_is_said_to_score_0_for_that_reason(
        tmp_path, monkeypatch, caplog):
    """The gate's re-score of a champion that knows none of the manifest's classes (the demo's
    champion against real Food-101 photos) says why it scores 0; one that knows them does
    not."""
    from pipeline.jobs import evaluate as job

    test = pd.DataFrame({"path": ["a.jpg", "b.jpg", "c.jpg"],
                         "label": ["apple_pie", "sushi", "sushi"]})
    predicted: list[str] = []
    monkeypatch.setattr(job.run_model, "predict_files",
                        lambda uri, paths, batch, desc: pd.DataFrame({"label": predicted}))
    score = job.champion_scorer(tmp_path, test, 8)
    predicted[:] = ["striped_green_disc", "solid_red_star", "striped_green_disc"]
    with caplog.at_level("WARNING", logger=job.__name__):
        assert score("models:/m/1") == 0.0
    assert ("the champion (models:/m/1) gave none of the 3 test images a label among their "
            "2 classes") in caplog.text
    caplog.clear()
    predicted[:] = ["sushi", "apple_pie", "striped_green_disc"]  # knows them, 0 right
    with caplog.at_level("WARNING", logger=job.__name__):
        assert score("models:/m/1") == 0.0
    assert caplog.text == ""


@pytest.mark.slow  # a fresh process per champion scored (the predict job's test has one too)
@pytest.mark.parametrize("legacy", [False, True], ids=["model-package", "old-code"])
def test_the_gate_re_scores_a_champion_of_another_manifest_with_its_own_code(
        champion_store, tmp_path, legacy):
    """A champion measured on another test manifest is re-measured on this one, in a fresh
    process, also when the old code logged it; the same model then ties (not promoted)."""
    from pipeline.jobs.evaluate import champion_scorer

    c = champion_store
    name = f"rescore-{'legacy' if legacy else 'new'}"
    source = log_legacy_model(c, tmp_path) if legacy else c.trained.run.model_uri
    old = registry.register(source, name, {"test_accuracy": "0.999999",
                                           "test_manifest_sha256": "0" * 64})
    registry.promote(name, old)
    challenger = registry.register(c.trained.run.model_uri, name, {})
    acc = c.evaluated.metrics["test_accuracy"]
    decision = registry.gate(name, challenger, acc, c.data.test.sha256, 0.0,
                             champion_scorer(c.data.root, c.data.test.frame, 8))
    assert decision.champion_test_accuracy == pytest.approx(acc)  # re-measured, not 0.999999
    assert decision.promoted is False  # a tie: the same weights
    kept = registry.get_version(name, old).tags[f"test_accuracy.{c.data.test.sha256[:12]}"]
    assert kept == f"{acc:.6f}"


def test_a_wrong_lock_expiry_stops_before_the_evaluation(champion_store, monkeypatch):
    from pipeline.jobs.evaluate import TestData, evaluate_and_log
    from pipeline.runs.lock import LockError

    c = champion_store
    monkeypatch.setenv("FOOD101_LOCK_TTL_SECONDS", "soon")
    before = mlflow.get_run(c.trained.run.run_id).info.end_time
    with pytest.raises(LockError, match="FOOD101_LOCK_TTL_SECONDS='soon'"):
        evaluate_and_log(TestData(c.data.root, c.data.classes, c.data.test), c.trained.run,
                         c.params.registry, c.params.compute, c.cache)
    assert mlflow.get_run(c.trained.run.run_id).info.end_time == before  # not re-opened
    assert len(registry.list_versions(c.name)) == 1
