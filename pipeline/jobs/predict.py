"""The ``predict`` job: label the unlabeled images with a registered model (default: the
champion) and score the labels against the answer key, which the model never sees."""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import pandas as pd

from pipeline.config import PredictConfig, RegistryConfig
from pipeline.handoffs import RunRef, UnlabeledKey
from pipeline.hashing import sha256_file
from pipeline.runs import registry, run_model, tracking

log = logging.getLogger(__name__)

PREDICTIONS_ARTIFACT = "predict/predictions.csv"
# On the run of the version that predicted: what ``predict/predictions.csv`` was made of (the
# version, the batch size, every file's name and bytes). The same digest later means the same
# predictions, so they are read back instead of loading the model in a fresh process again.
INPUTS_TAG = "predict_inputs_sha256"


def inputs_digest(model_uri: str, files: list[Path], batch_size: int) -> str:
    """sha256 of what a prediction depends on: the pinned model, the batch size, the files."""
    h = hashlib.sha256(f"{model_uri}\n{batch_size}\n".encode())
    for f in files:
        h.update(f"{f.name}\t{sha256_file(f)}\n".encode())
    return h.hexdigest()


def earlier_predictions(who: registry.ModelRef, files: list[Path]) -> pd.DataFrame | None:
    """The predictions in the run of ``who`` (``predict/predictions.csv``), when they are of
    ``files``; None without them. The caller has checked the run's digest tag."""
    text = tracking.read_artifact_text(who.run_id, PREDICTIONS_ARTIFACT)
    if text is None:
        return None
    out = pd.read_csv(io.StringIO(text), dtype={"file": str, "label": str, "top5": str,
                                                "error": str})
    return out if out["file"].tolist() == [f.name for f in files] else None


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

    A version that already predicted exactly these files at this batch size (its run's
    ``predict_inputs_sha256`` tag) is not loaded again: its ``predict/predictions.csv`` is
    read back (tag ``predict_reused``), which is what a head-only experiment whose
    challenger lost to an unchanged champion needs. The files written are the same bytes.
    """
    name, ref = registry_cfg.model_name, predict_cfg.model
    who = registry.resolve(name, ref)  # one lookup, a clear error when missing
    digest = inputs_digest(who.uri, files, predict_cfg.batch_size)
    vouched = tracking.run_tag(who.run_id, INPUTS_TAG) if who.run_id else None
    out = earlier_predictions(who, files) if vouched == digest else None
    reused = out is not None
    if reused:  # a head-only experiment whose challenger lost: the champion is the same
        log.info("%s v%s already predicted these %d images (the same files and batch size): "
                 "its run's %s is read back, the model is not loaded again", name,
                 who.version, len(files), PREDICTIONS_ARTIFACT)
    else:
        if vouched is not None:  # it must never vouch for the predictions replacing these
            tracking.delete_tag(who.run_id, INPUTS_TAG)
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
            "predict_model_run_id": who.run_id, "predict_reused": str(reused).lower()}
    with tracking.resume_run(run):
        tracking.set_tags(tags)
        if who.run_id == run.run_id and not reused:
            tracking.log_metrics({"predict_accuracy": metrics["accuracy"]})
            tracking.log_text(out.to_csv(index=False), PREDICTIONS_ARTIFACT)
            tracking.set_tags({INPUTS_TAG: digest})  # after the file it vouches for
    if who.run_id and who.run_id != run.run_id and not reused:
        tracking.log_to_run(who.run_id, {"predict_accuracy": metrics["accuracy"]},
                            {"predict_pipeline_run_id": run.run_id},
                            {PREDICTIONS_ARTIFACT: out.to_csv(index=False)})
        tracking.log_to_run(who.run_id, {}, {INPUTS_TAG: digest}, {})  # after the file
    log.info("predicted %d images with %s (v%s, run %s): accuracy %.4f against the answer "
             "key%s", len(out), name, who.version, who.run_id, metrics["accuracy"],
             f", {errors} unreadable" if errors else "")
    return out, metrics
