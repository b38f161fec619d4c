"""The ``predict`` job: label the unlabeled images with a registered model (default: the
champion) and score the labels against the answer key, which the model never sees."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from pipeline.config import PredictConfig, RegistryConfig
from pipeline.handoffs import RunRef, UnlabeledKey
from pipeline.runs import registry, run_model, tracking

log = logging.getLogger(__name__)


def predict_and_log(
    files: list[Path],
    key: UnlabeledKey,
    registry_cfg: RegistryConfig,
    predict_cfg: PredictConfig,
    run: RunRef,
) -> tuple[pd.DataFrame, dict]:
    """Predictions (file, label, confidence, top5, error) and ``accuracy`` against the key.

    The model runs in a fresh process with the code it carries (``run_model.predict_files``);
    ``predict.batch_size`` is its inference batch size. A metric on a run describes that
    run's model: ``predict_accuracy`` and the predictions go to the run that trained the
    version that predicted (this pipeline's run when it is the champion); this run records
    which version that was (tags ``predict_model_*``).
    """
    name, ref = registry_cfg.model_name, predict_cfg.model
    who = registry.resolve(name, ref)  # one lookup, a clear error when missing
    preds = run_model.predict_files(who.uri, files, predict_cfg.batch_size)
    out = pd.concat([pd.DataFrame({"file": [f.name for f in files]}),
                     preds.reset_index(drop=True)], axis=1)
    truth = out["file"].map(key.frame.set_index("file")["label"])
    errors = int(out["error"].notna().sum()) if "error" in out else 0
    metrics = {
        "accuracy": float((out["label"] == truth).mean()) if len(out) else 0.0,
        "images": len(out),
        "errors": errors,
        "model_version": int(who.version),
    }
    tags = {"predict_model_uri": who.uri, "predict_model_version": who.version,
            "predict_model_run_id": who.run_id}
    with tracking.resume_run(run):
        tracking.set_tags(tags)
        if who.run_id == run.run_id:
            tracking.log_metrics({"predict_accuracy": metrics["accuracy"]})
            tracking.log_text(out.to_csv(index=False), "predict/predictions.csv")
    if who.run_id and who.run_id != run.run_id:
        tracking.log_to_run(who.run_id, {"predict_accuracy": metrics["accuracy"]},
                            {"predict_pipeline_run_id": run.run_id},
                            {"predict/predictions.csv": out.to_csv(index=False)})
    log.info("predicted %d images with %s (v%s, run %s): accuracy %.4f against the answer "
             "key%s", len(out), name, who.version, who.run_id, metrics["accuracy"],
             f", {errors} unreadable" if errors else "")
    return out, metrics
