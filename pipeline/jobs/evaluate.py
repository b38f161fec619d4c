"""The ``evaluate`` job: score the run's logged model on the test manifest, log it, register a
new version and gate it."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline.compute import resolve_compute
from pipeline.config import ComputeConfig, RegistryConfig
from pipeline.evaluation import (
    classification_metrics,
    confusion,
    per_class_accuracy,
    per_class_report,
    worst_predictions,
)
from pipeline.features.scoring import score_manifest
from pipeline.handoffs import Manifest, Promotion, RunRef
from pipeline.model.imaging import load_image
from pipeline.model.pyfunc import load_trained
from pipeline.plots import (
    Misclassified,
    confusion_figure,
    per_class_accuracy_figure,
    png_bytes,
    worst_predictions_figure,
)
from pipeline.runs import lock, notes, registry, run_model, tracking
from pipeline.runs.store import TrackingError

log = logging.getLogger(__name__)

WORST_IMAGES = 16  # test images in the grid of the worst-classified ones


@dataclass(frozen=True)
class TestData:
    root: Path
    classes: tuple[str, ...]
    test: Manifest


@dataclass(frozen=True)
class EvalFigures:
    """The pictures of the test set (also logged to the run under ``evaluation/``)."""

    confusion: Figure  # confusion matrix, class names on both axes
    per_class: Figure  # per-class accuracy, sorted bars
    worst: Figure  # the worst-classified test images with true and predicted labels

    def pngs(self) -> dict[str, bytes]:
        """Each picture rendered once, by the name its file and artifact have."""
        return {"confusion_matrix": png_bytes(self.confusion),
                "per_class_accuracy": png_bytes(self.per_class),
                "worst_predictions": png_bytes(self.worst)}


@dataclass(frozen=True)
class EvalOutputs:
    metrics: dict  # test_accuracy, test_top5_accuracy, test_macro_f1
    per_class: pd.DataFrame  # class, precision, recall, f1, support
    confusion: pd.DataFrame  # one row per test image: actual, predicted (for dvc plots)
    accuracy: pd.DataFrame  # class, accuracy, support: worst first (for dvc plots)
    decision: Promotion
    figures: EvalFigures
    pngs: dict[str, bytes]  # the figures as PNG: what the run holds, what the stage writes


def draw_figures(data: TestData, y_true: np.ndarray, probs: np.ndarray, cm: np.ndarray,
                 accuracy: pd.DataFrame, test_accuracy: float) -> EvalFigures:
    """The confusion matrix, per-class accuracy and worst-classified images of a test set."""
    classes, y_pred = list(data.classes), probs.argmax(1)
    paths = data.test.frame["path"].tolist()
    worst = [
        Misclassified(load_image(data.root / paths[i]), classes[y_true[i]], classes[y_pred[i]],
                      float(probs[i, y_pred[i]]), float(probs[i, y_true[i]]))
        for i in worst_predictions(y_true, probs, WORST_IMAGES)
    ]
    return EvalFigures(
        confusion_figure(cm, classes,
                         f"Confusion matrix, test set (accuracy {test_accuracy:.3f})"),
        per_class_accuracy_figure(accuracy, test_accuracy),
        worst_predictions_figure(worst),
    )


def labels_accuracy(labels: list[str], truth: list[str]) -> float:
    """Share of predicted labels equal to the true ones."""
    return float(np.mean(np.asarray(labels) == np.asarray(truth))) if truth else 0.0


def champion_scorer(root: Path, test: pd.DataFrame, batch_size: int) -> Callable[[str], float]:
    """What the gate calls to re-measure another registered model on this test manifest: its
    accuracy, computed in a fresh process with the code that model carries (so versions
    logged by older code are scored by that code)."""
    paths = [root / p for p in test["path"]]

    def score(model_uri: str) -> float:
        labels = run_model.predict_files(model_uri, paths, batch_size,
                                         desc="re-score champion")["label"].tolist()
        truth = test["label"].tolist()
        if labels and not set(labels) & set(truth):  # a 0 that would otherwise read as a bug
            log.warning("the champion (%s) gave none of the %d test images a label among "
                        "their %d classes, as a model trained on other classes does: it "
                        "scores 0 on this test manifest", model_uri, len(truth),
                        len(set(truth)))
        return labels_accuracy(labels, truth)

    return score


def evaluate_and_log(
    data: TestData,
    run: RunRef,
    registry_cfg: RegistryConfig,
    compute_cfg: ComputeConfig,
    cache_dir: Path | None,
) -> EvalOutputs:
    """Test metrics (always against the true labels), per-class report and confusion matrix
    in the run; then a new registry version and the promotion gate.

    ``compute_cfg`` gives the device, the extraction batch size, decoding workers and the
    compile policy (resolved as for training, in one process); the precision is the one the
    logged model resolves on that device.
    """
    # checked before the run is re-opened
    compute = resolve_compute(dataclasses.replace(compute_cfg, nproc=1))
    lock.lock_ttl()  # a wrong FOOD101_LOCK_TTL_SECONDS stops here, not after the evaluation
    df = data.test.frame
    classes = list(data.classes)
    y_true = df["class_index"].to_numpy()
    with tracking.resume_run(run) as run_id:
        with tempfile.TemporaryDirectory() as tmp:
            card, state = load_trained(tracking.download_model(run.model_uri, Path(tmp)))
        if list(card.classes) != classes:
            raise TrackingError(
                "the logged model's classes differ from reports/sample.json: re-run train")
        probs = score_manifest(card, state, data.root, df, compute, cache_dir)
        y_pred = probs.argmax(1)
        metrics = classification_metrics(y_true, probs)
        per_class = per_class_report(y_true, y_pred, classes)
        cm = confusion(y_true, y_pred, len(classes))
        accuracy = per_class_accuracy(y_true, y_pred, classes)
        digest = tracking.log_manifest(data.test, "test", "testing")
        tracking.log_metrics(metrics)
        figures = draw_figures(data, y_true, probs, cm, accuracy, metrics["test_accuracy"])
        pngs = figures.pngs()
        for name, png in pngs.items():
            tracking.log_png(png, f"evaluation/{name}.png")
        tracking.log_text(per_class.to_csv(index=False), "evaluation/per_class_report.csv")
        tracking.log_text(pd.DataFrame(cm, index=classes, columns=classes).to_csv(),
                          "evaluation/confusion_matrix.csv")

        name = registry_cfg.model_name
        version = registry.register(run.model_uri, name, {
            "run_id": run_id,
            "test_accuracy": f"{metrics['test_accuracy']:.6f}",
            "test_top5_accuracy": f"{metrics['test_top5_accuracy']:.6f}",
            "test_macro_f1": f"{metrics['test_macro_f1']:.6f}",
            "test_manifest_sha256": digest,
        })
        decision = registry.gate(name, version, metrics["test_accuracy"], digest,
                                 registry_cfg.min_delta,
                                 champion_scorer(data.root, df, compute_cfg.feature_batch_size),
                                 run_id)
        tracking.set_tags({"registered_version": version,
                           "promotion": "promoted" if decision.promoted else "rejected"})
        tracking.log_dict(decision.as_dict(), "evaluation/promotion.json")
        # The descriptions people read in the UI: the run's, the version's, the model's.
        tracking.set_run_note_section("Evaluation and promotion", notes.evaluation_section(
            name, version, metrics, data.test.path, len(df), decision))
        registry.describe(name, version, notes.version_note(
            metrics, data.test.path, len(df), digest, run.run_name,
            notes.run_route(tracking.active_experiment_id(), run_id), decision))
    confusion_rows = pd.DataFrame({"actual": [classes[i] for i in y_true],
                                   "predicted": [classes[i] for i in y_pred]})
    return EvalOutputs(metrics, per_class, confusion_rows, accuracy, decision, figures, pngs)
