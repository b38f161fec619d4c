"""What each model stage does, end to end: library calls plus tracking, returning the metrics
dicts that the stage writes to its DVC files (the same dicts go to MLflow).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pipeline import registry, tracking
from pipeline.config import Params
from pipeline.paths import feature_cache_dir

# Heavier modules (scikit-learn, matplotlib, the training code) are imported inside the
# function that needs them: each stage is its own process, and start-up time is a large
# part of a head-only `dvc exp run`.

log = logging.getLogger(__name__)


@dataclass
class TrainOutputs:
    run_id: str
    run_name: str
    model_uri: str
    metrics: dict  # final train_loss, val_loss, val_accuracy
    history: list[dict]  # one row per epoch
    resolved: dict  # values the params did not say (weights used, precision, ...)


def read_manifest(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"path": str, "label": str, "sha256": str})


def train_and_log(
    params: Params,
    root: Path,
    classes: list[str],
    manifests: dict[str, Path],
    baseline: dict | None,
    figures_dir: Path,
) -> TrainOutputs:
    """Open the pipeline's MLflow run, train, log everything (learning curves drawn into
    ``figures_dir``), and log the model."""
    from pipeline.modeling import preprocessing_spec
    from pipeline.plots import plot_history
    from pipeline.training import train_model, uses_feature_cache

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    train_df, val_df = read_manifest(manifests["train"]), read_manifest(manifests["val"])
    flat = params.flat()
    name = tracking.run_name(tracking.describe_changes(flat, baseline))
    tags = {**tracking.git_tags(), "params_hash": params.digest(), "stage": "train"}
    with tracking.start_run(params.mlflow.experiment, name, tags) as run_id:
        tracking.log_params(flat)
        for split, path in manifests.items():
            tracking.log_manifest(path, split, "training" if split == "train" else split)

        def on_epoch(epoch: int, metrics: dict) -> None:
            tracking.log_metrics(
                {k: metrics[k] for k in ("train_loss", "val_loss", "val_accuracy")}, step=epoch
            )

        def on_step(step: int, loss: float) -> None:
            tracking.log_metric("train_step_loss", loss, step=step)

        cache = feature_cache_dir() if uses_feature_cache(params.model, params.train) else None
        result = train_model(
            root, train_df, val_df, classes, params.model, params.train,
            params.data.image_size, cache, on_epoch=on_epoch, on_step=on_step,
        )
        resolved = {
            "resolved.weights": result.weights_used,
            "resolved.precision": result.precision,
            "resolved.device": "cpu",
            "resolved.torch_threads": torch.get_num_threads(),
            "resolved.training_path": result.path,
            "resolved.num_classes": len(classes),
            "resolved.train_images": len(train_df),
            "resolved.val_images": len(val_df),
        }
        tracking.log_params(resolved)
        if result.feature_stats:  # an artifact, not metrics: keeps the metric charts clean
            tracking.log_dict(result.feature_stats, "training/feature_cache.json")
        meta = {
            "arch": params.model.arch,
            "classes": classes,
            "image_size": params.data.image_size,
            "hidden": params.model.hidden,
            "dropout": params.model.dropout,
            "feature_norm": params.model.feature_norm,
            "precision": result.precision,
            "batch_size": params.predict.batch_size,
            "preprocessing": preprocessing_spec(params.data.image_size),
            "weights": result.weights_used,
            "run_id": run_id,
        }
        examples = [(root / p).read_bytes() for p in val_df["path"].head(2)]
        curves = plot_history(pd.DataFrame(result.history), figures_dir / "learning_curves.png")
        tracking.log_artifact(curves, "training")
        model_uri = tracking.log_model(result.model, meta, examples)
        log.info("logged model %s", model_uri)
    return TrainOutputs(run_id, name, model_uri, result.final, result.history, resolved)


@dataclass
class EvalOutputs:
    metrics: dict
    per_class: pd.DataFrame
    confusion: pd.DataFrame  # one row per test image: actual, predicted (for dvc plots)
    decision: dict


def _score_manifest(clf, root: Path, df: pd.DataFrame, cache_dir: Path | None, workers: int):
    """[N,C] probabilities of a loaded FoodClassifier on a manifest, via the feature cache."""
    from pipeline.training import backbone_features

    feats, _ = backbone_features(
        clf.model.backbone, clf.meta["arch"], root, df, image_size=clf.image_size,
        precision=clf.precision, cache_dir=cache_dir, batch_size=clf.batch_size,
        num_workers=workers,
    )
    with torch.inference_mode():
        return clf.model.head(torch.from_numpy(feats)).exp().numpy()


def evaluate_and_log(
    params: Params, root: Path, classes: list[str], test_manifest: Path, run: dict,
    figures_dir: Path,
) -> EvalOutputs:
    """Score the run's logged model on the test manifest, log it, register it, gate it."""
    from pipeline.evaluation import classification_metrics, confusion, per_class_report
    from pipeline.plots import plot_confusion

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    test_df = read_manifest(test_manifest)
    y_true = test_df["class_index"].to_numpy()
    cache = feature_cache_dir()
    workers = params.train.num_workers
    with tracking.resume_run(run["run_id"]) as run_id:
        clf = tracking.load_pyfunc(run["model_uri"]).unwrap_python_model()
        if list(clf.classes) != list(classes):
            raise tracking.TrackingError(
                "the logged model's classes differ from reports/sample.json: re-run train"
            )
        probs = _score_manifest(clf, root, test_df, cache, workers)
        y_pred = probs.argmax(1)
        metrics = classification_metrics(y_true, probs)
        per_class = per_class_report(y_true, y_pred, classes)
        cm = confusion(y_true, y_pred, len(classes))
        digest = tracking.log_manifest(test_manifest, "test", "testing")
        tracking.log_metrics(metrics)
        title = f"Confusion matrix, test set (accuracy {metrics['test_accuracy']:.3f})"
        png = plot_confusion(cm, classes, figures_dir / "confusion_matrix.png", title)
        tracking.log_artifact(png, "evaluation")
        with tempfile.TemporaryDirectory() as tmp:
            per_class.to_csv(Path(tmp) / "per_class_report.csv", index=False)
            pd.DataFrame(cm, index=classes, columns=classes).to_csv(
                Path(tmp) / "confusion_matrix.csv")
            tracking.log_artifact(Path(tmp) / "per_class_report.csv", "evaluation")
            tracking.log_artifact(Path(tmp) / "confusion_matrix.csv", "evaluation")

        def score_other(uri: str) -> float:
            other = tracking.load_pyfunc(uri).unwrap_python_model()
            p = _score_manifest(other, root, test_df, cache, workers)
            return classification_metrics(y_true, p)["test_accuracy"]

        name = params.registry.model_name
        version = registry.register(run["model_uri"], name, {
            "run_id": run_id,
            "test_accuracy": f"{metrics['test_accuracy']:.6f}",
            "test_top5_accuracy": f"{metrics['test_top5_accuracy']:.6f}",
            "test_macro_f1": f"{metrics['test_macro_f1']:.6f}",
            "test_manifest_sha256": digest,
        })
        decision = registry.gate(name, version, metrics["test_accuracy"], digest,
                                 params.registry.min_delta, score_other)
        decision["run_id"] = run_id
        tracking.set_tags({"registered_version": version,
                           "promotion": "promoted" if decision["promoted"] else "rejected"})
        tracking.log_dict(decision, "evaluation/promotion.json")
    confusion_rows = pd.DataFrame({"actual": [classes[i] for i in y_true],
                                   "predicted": [classes[i] for i in y_pred]})
    return EvalOutputs(metrics, per_class, confusion_rows, decision)


def predict_and_log(
    params: Params, unlabeled_dir: Path, answer_key: Path, run: dict
) -> tuple[pd.DataFrame, dict]:
    """Predict the unlabeled images with ``predict.model`` of the registry (default: the
    champion); accuracy against the answer key, which the model never sees."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    name, ref = params.registry.model_name, params.predict.model
    uri, version = registry.resolve(name, ref)  # one lookup, a clear error when missing
    model = tracking.load_pyfunc(uri)
    files = sorted(p.name for p in unlabeled_dir.iterdir() if p.is_file())
    preds = model.predict(pd.DataFrame({"path": [str(unlabeled_dir / f) for f in files]}))
    out = pd.concat([pd.DataFrame({"file": files}), preds.reset_index(drop=True)], axis=1)
    key = pd.read_csv(answer_key, dtype=str).set_index("file")["label"]
    truth = out["file"].map(key)
    metrics = {
        "accuracy": float((out["label"] == truth).mean()) if len(out) else 0.0,
        "images": len(out),
        "model_version": int(version),
    }
    with tracking.resume_run(run["run_id"]):
        tracking.log_metrics({"predict_accuracy": metrics["accuracy"]})
        tracking.set_tags({"predict_model_uri": uri, "predict_model_version": version})
        with tempfile.TemporaryDirectory() as tmp:
            out.to_csv(Path(tmp) / "predictions.csv", index=False)
            tracking.log_artifact(Path(tmp) / "predictions.csv", "predict")
    log.info("predicted %d images with %s (v%s): accuracy %.4f against the answer key",
             len(out), uri, version, metrics["accuracy"])
    return out, metrics
