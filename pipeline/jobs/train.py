"""The ``train`` job: open the pipeline's MLflow run, train, log everything and the model.

In one process it does all of it. As one rank of several that torchrun started (the train
stage runs itself under torchrun for ``compute.nproc`` > 1; several machines run
``torchrun --nnodes=M ... -m stages.train``), rank 0 owns the MLflow run, logs and returns
the outputs; the other ranks train beside it and return None.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from pipeline import distributed
from pipeline.compute import Compute
from pipeline.config import Params
from pipeline.handoffs import RunRef
from pipeline.model import pyfunc
from pipeline.model.card import ModelCard
from pipeline.model.presets import Preprocessing
from pipeline.plots import learning_curves, png_bytes
from pipeline.runs import store, tracking
from pipeline.runs.spec import RunSpec, run_spec
from pipeline.training import (
    TrainData,
    TrainJob,
    TrainResult,
    build_network,
    head_spec,
    train_model,
)

__all__ = ["TrainData", "TrainJob", "TrainOutputs", "TrainRun", "train_and_log"]

log = logging.getLogger(__name__)

SCORES = ("train_loss", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class TrainRun:
    """One training run, resolved once by the stage: the job (what to train, where) and the
    MLflow run that records it."""

    job: TrainJob
    spec: RunSpec
    model_name: str  # registry.model_name: the experiment's description points to it

    @classmethod
    def from_params(cls, params: Params, data: TrainData, cache_dir: Path | None, *,
                    compute: Compute | None = None,
                    spec: RunSpec | None = None) -> TrainRun:
        """The run ``params`` describe (``compute`` and ``spec`` resolved here when None)."""
        return cls(TrainJob.from_params(params, data, cache_dir, compute),
                   spec or run_spec(params), params.registry.model_name)


@dataclass(frozen=True)
class TrainOutputs:
    run: RunRef
    metrics: dict  # final train_loss, val_loss, val_accuracy
    history: pd.DataFrame  # one row per epoch (train_loss, val_loss, val_accuracy)
    curves: Figure  # learning curves
    curves_png: bytes  # the curves as PNG: what the run holds, what the stage writes


def train_and_log(run: TrainRun) -> TrainOutputs | None:
    """Train in a new MLflow run: per-epoch metrics with their step, resolved values (the
    device, precision, processes...), the learning curves, the manifests as datasets, and the
    self-contained model.

    What can be checked before work is checked before the run is opened (the device, the
    weights, the store): a failed check leaves no run behind. As a rank other than 0 of a
    DDP run this trains and returns None.
    """
    job = run.job
    with distributed.joined(job.compute) as group:
        # the weights are loaded first: a missing file stops here, before any run is opened
        network = build_network(job.model, len(job.data.classes), job.train.seed)
        if group is not None and not group.is_main:
            group.barrier()  # rank 0 has checked the store and opened the run
            train_model(job, network=network, group=group)
            return None
        store.check_store()
        with tracking.start_run(run.spec) as run_id:
            if group is not None:
                group.barrier()
            tracking.log_manifest(job.data.train, "train", "training")
            tracking.log_manifest(job.data.val, "val", "val")
            log.info("training on %s (%s), %s, %d process(es)", job.compute.device,
                     job.compute.device_name, job.compute.precision, job.compute.nproc)
            # metrics go to the run from a background thread: the loop never waits on
            # the store, and a restart of a tracking server is ridden out meanwhile
            with tracking.metric_sender(run_id) as metrics:
                result = train_model(
                    job, network=network, group=group,
                    on_epoch=lambda epoch, m: metrics.log(
                        {k: m[k] for k in (*SCORES, "lr") if k in m}, epoch),
                    on_step=lambda step, loss: metrics.log({"train_step_loss": loss}, step))
            history = pd.DataFrame(result.history)[["epoch", *SCORES]]
            curves = learning_curves(history)
            png = png_bytes(curves)
            model_uri = _log_result(run, result, png, run_id)
    return TrainOutputs(RunRef(run_id, run.spec.name, model_uri, store.display_uri()),
                        result.final, history, curves, png)


def _log_result(run: TrainRun, result: TrainResult, curves_png: bytes, run_id: str) -> str:
    """Resolved values, descriptions, the curves and the model, to the active run; the
    model's URI."""
    job = run.job
    train_df, val_df = job.data.train.frame, job.data.val.frame
    tracking.log_params({
        "resolved.weights": result.weights_used,
        "resolved.precision": result.precision,
        **job.compute.as_params(),
        "resolved.training_path": result.path,
        "resolved.num_classes": len(job.data.classes),
        "resolved.train_images": len(train_df),
        "resolved.val_images": len(val_df),
        "resolved.keep": job.train.keep,
        "resolved.kept_epoch": result.kept_epoch,
    })
    # The descriptions people read in the UI: the experiment's and this run's.
    tracking.describe_experiment(tracking.active_experiment_id(), run.model_name)
    tracking.describe_run(run.spec, {
        "data": f"{len(train_df)} train / {len(val_df)} validation images of "
                f"{len(job.data.classes)} classes",
        "backbone weights": result.weights_used,
        "training": f"{result.path}, precision {result.precision}",
    })
    if result.feature_stats:  # an artifact, not metrics: keeps the metric charts clean
        tracking.log_dict(result.feature_stats, "training/feature_cache.json")
    tracking.log_dict({**job.compute.as_params(), "precision": result.precision,
                       **result.throughput}, "training/compute.json")
    tracking.log_png(curves_png, "training/learning_curves.png")
    card = ModelCard(
        arch=job.model.arch, classes=tuple(job.data.classes), image_size=job.image_size,
        head=head_spec(job.model), weights=result.weights_used, precision=result.precision,
        preprocessing=Preprocessing.for_size(job.image_size), run_id=run_id,
    )
    examples = [(job.data.root / p).read_bytes() for p in val_df["path"].head(2)]
    model_uri = store.store_call("log the model", pyfunc.log_model, result.model, card,
                                    examples)
    log.info("logged model %s", model_uri)
    return model_uri
