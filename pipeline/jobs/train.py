"""The ``train`` job: open the pipeline's MLflow run, train, log everything and the model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure

from pipeline.config import ModelConfig, TrainConfig
from pipeline.handoffs import Manifest, RunRef
from pipeline.model import pyfunc
from pipeline.model.card import ModelCard
from pipeline.model.presets import Preprocessing
from pipeline.plots import DPI, learning_curves
from pipeline.runs import tracking
from pipeline.training import build_network, head_spec, train_model

log = logging.getLogger(__name__)

SCORES = ("train_loss", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class TrainData:
    """What ``sample`` and ``split`` produced: the image root, class order and manifests."""

    root: Path
    classes: tuple[str, ...]
    train: Manifest
    val: Manifest


@dataclass(frozen=True)
class TrainOutputs:
    run: RunRef
    metrics: dict  # final train_loss, val_loss, val_accuracy
    history: pd.DataFrame  # one row per epoch (train_loss, val_loss, val_accuracy)
    resolved: dict  # values the params did not say (weights used, precision, ...)
    curves: Figure  # learning curves (also logged to the run)


def train_and_log(
    data: TrainData,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    image_size: int,
    run: tracking.RunSpec,
    cache_dir: Path | None,
) -> TrainOutputs:
    """Train in a new MLflow run: per-epoch metrics with their step, resolved values, the
    learning curves, the manifests as datasets, and the self-contained model.

    What can be checked before work is checked before the run is opened (the weights, the
    store): a failed check leaves no run behind.
    """
    train_df, val_df = data.train.frame, data.val.frame
    network = build_network(model_cfg, len(data.classes), train_cfg.seed)
    tracking.check_store()
    with tracking.start_run(run) as run_id:
        tracking.log_manifest(data.train, "train", "training")
        tracking.log_manifest(data.val, "val", "val")

        def on_epoch(epoch: int, metrics: dict) -> None:
            tracking.log_metrics({k: metrics[k] for k in SCORES}, step=epoch)

        def on_step(step: int, loss: float) -> None:
            tracking.log_metric("train_step_loss", loss, step=step)

        result = train_model(data.root, train_df, val_df, list(data.classes), model_cfg,
                             train_cfg, image_size, cache_dir, on_epoch=on_epoch,
                             on_step=on_step, network=network)
        resolved = {
            "resolved.weights": result.weights_used,
            "resolved.precision": result.precision,
            "resolved.device": "cpu",
            "resolved.torch_threads": torch.get_num_threads(),
            "resolved.training_path": result.path,
            "resolved.num_classes": len(data.classes),
            "resolved.train_images": len(train_df),
            "resolved.val_images": len(val_df),
        }
        tracking.log_params(resolved)
        # The descriptions people read in the UI: the experiment's and this run's.
        tracking.describe_experiment(tracking.active_experiment_id(),
                                     str(run.params.get("registry.model_name")))
        tracking.set_run_note(tracking.run_note(run.params, tracking.committed_params(), {
            "data": f"{len(train_df)} train / {len(val_df)} validation images of "
                    f"{len(data.classes)} classes",
            "backbone weights": result.weights_used,
            "training": f"{result.path}, precision {result.precision}",
        }))
        if result.feature_stats:  # an artifact, not metrics: keeps the metric charts clean
            tracking.log_dict(result.feature_stats, "training/feature_cache.json")
        history = pd.DataFrame(result.history)[["epoch", *SCORES]]
        curves = learning_curves(history)
        tracking.log_figure(curves, "training/learning_curves.png", DPI)
        card = ModelCard(
            arch=model_cfg.arch, classes=tuple(data.classes), image_size=image_size,
            head=head_spec(model_cfg), weights=result.weights_used, precision=result.precision,
            preprocessing=Preprocessing.for_size(image_size), run_id=run_id,
        )
        examples = [(data.root / p).read_bytes() for p in val_df["path"].head(2)]
        model_uri = tracking.store_call("log the model", pyfunc.log_model, result.model, card,
                                        examples)
        log.info("logged model %s", model_uri)
    return TrainOutputs(RunRef(run_id, run.name, model_uri), result.final, history, resolved,
                        curves)
