"""The ``predict`` job: label the unlabeled images with a registered model (default: the
champion) and score the labels against the answer key, which the model never sees."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline.config import PredictConfig, RegistryConfig
from pipeline.handoffs import RunRef, UnlabeledKey
from pipeline.runs import registry, tracking

log = logging.getLogger(__name__)


def predict_and_log(
    files: list[Path],
    key: UnlabeledKey,
    registry_cfg: RegistryConfig,
    predict_cfg: PredictConfig,
    run: RunRef,
) -> tuple[pd.DataFrame, dict]:
    """Predictions (file, label, confidence, top5) and ``accuracy`` against the answer key.

    The model runs in a fresh process with the code it carries (``registry.predict_files``);
    ``predict.batch_size`` is its inference batch size.
    """
    name, ref = registry_cfg.model_name, predict_cfg.model
    uri, version = registry.resolve(name, ref)  # one lookup, a clear error when missing
    preds = registry.predict_files(uri, files, predict_cfg.batch_size)
    out = pd.concat([pd.DataFrame({"file": [f.name for f in files]}),
                     preds.reset_index(drop=True)], axis=1)
    truth = out["file"].map(key.frame.set_index("file")["label"])
    metrics = {
        "accuracy": float((out["label"] == truth).mean()) if len(out) else 0.0,
        "images": len(out),
        "model_version": int(version),
    }
    with tracking.resume_run(run.run_id):
        tracking.log_metrics({"predict_accuracy": metrics["accuracy"]})
        tracking.set_tags({"predict_model_uri": uri, "predict_model_version": version})
        tracking.log_text(out.to_csv(index=False), "predict/predictions.csv")
    log.info("predicted %d images with %s (v%s): accuracy %.4f against the answer key",
             len(out), uri, version, metrics["accuracy"])
    return out, metrics
