"""The ``train`` job: open the pipeline's MLflow run, train (in this process, or in
``train.nproc`` DDP workers started by PyTorch's launcher), log everything and the model.

This process owns the MLflow run (and ends it KILLED on SIGTERM); DDP workers train, rank 0
logs the per-epoch and step metrics to that run by its id and hands the trained weights back
in a temporary file. Only this process writes the model and, through the stage, DVC's outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure

from pipeline import distributed
from pipeline.config import ComputeConfig, ModelConfig, TrainConfig
from pipeline.distributed import Group
from pipeline.handoffs import Manifest, RunRef
from pipeline.model import pyfunc
from pipeline.model.card import ModelCard
from pipeline.model.network import FoodNet
from pipeline.model.presets import Preprocessing
from pipeline.plots import DPI, learning_curves
from pipeline.runs import store, tracking
from pipeline.runs.spec import RunSpec
from pipeline.training import (
    Compute,
    TrainResult,
    build_network,
    head_spec,
    resolve_compute,
    train_model,
)

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


class _RunLogger:
    """Per-epoch scores and the step-level loss, to the active run or to ``run_id`` (a DDP
    worker logs to the run its launcher owns)."""

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id
        if run_id is not None:  # another process: point it at the same store
            store.configure()

    def epoch(self, epoch: int, metrics: dict) -> None:
        keys = [*SCORES, "lr"] if "lr" in metrics else SCORES
        tracking.log_metrics({k: metrics[k] for k in keys}, step=epoch, run_id=self.run_id)

    def step(self, step: int, loss: float) -> None:
        tracking.log_metric("train_step_loss", loss, step=step, run_id=self.run_id)


@dataclass(frozen=True)
class _WorkerTask:
    """What each DDP worker needs (pickled to it)."""

    root: Path
    train: pd.DataFrame
    val: pd.DataFrame
    classes: tuple[str, ...]
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    image_size: int
    cache_dir: Path | None
    compute: Compute
    run_id: str
    result: Path  # where rank 0 leaves the trained weights and history


def _train_worker(group: Group, task: _WorkerTask) -> None:
    """One DDP rank: train; rank 0 logs to the run and saves the result for the launcher."""
    logger = _RunLogger(task.run_id) if group.is_main else None
    result = train_model(task.root, task.train, task.val, list(task.classes), task.model_cfg,
                         task.train_cfg, task.image_size, task.cache_dir,
                         on_epoch=logger.epoch if logger else None,
                         on_step=logger.step if logger else None,
                         compute=task.compute, group=group)
    if group.is_main:
        torch.save({"state": result.model.state_dict(), "history": result.history,
                    "weights_used": result.weights_used, "path": result.path,
                    "feature_stats": result.feature_stats, "throughput": result.throughput},
                   task.result)


def _train_distributed(task: _WorkerTask, network: FoodNet) -> TrainResult:
    """Train in ``task.compute.nproc`` workers; ``network`` (built here to check the weights
    before the run was opened) receives rank 0's trained weights."""
    compute = task.compute
    with tempfile.TemporaryDirectory(prefix="food101-ddp-") as tmp:
        task = dataclasses.replace(task, result=Path(tmp) / "result.pt")
        distributed.launch(_train_worker, (task,), nproc=compute.nproc,
                           device_type=compute.device_type, threads=compute.threads,
                           workdir=Path(tmp))
        out = torch.load(task.result, map_location="cpu", weights_only=True)
    network.load_state_dict(out["state"])
    return TrainResult(network.eval(), out["history"], compute.precision, out["weights_used"],
                       out["path"], out["feature_stats"], task.train_cfg.keep,
                       out["throughput"])


def train_and_log(
    data: TrainData,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    image_size: int,
    run: RunSpec,
    cache_dir: Path | None,
    compute_cfg: ComputeConfig,
) -> TrainOutputs | None:
    """Train in a new MLflow run: per-epoch metrics with their step, resolved values (the
    device, precision, processes...), the learning curves, the manifests as datasets, and the
    self-contained model.

    What can be checked before work is checked before the run is opened (the device, the
    weights, the store): a failed check leaves no run behind.

    Started by an outside ``torchrun`` as one of several workers (several machines), this
    process is one rank: rank 0 owns the run and returns the outputs, the others train and
    return None.
    """
    compute = resolve_compute(compute_cfg, train_cfg.precision)
    with distributed.torchrun_group(compute.device_type) as group:
        if group is not None:
            compute = dataclasses.replace(
                compute, nproc=group.world_size, threads=torch.get_num_threads(),
                device="cuda" if compute.device_type == "cuda" else compute.device)
        return _train_and_log(data, model_cfg, train_cfg, image_size, run, cache_dir,
                              compute, group)


def _train_and_log(data: TrainData, model_cfg: ModelConfig, train_cfg: TrainConfig,
                   image_size: int, run: RunSpec, cache_dir: Path | None,
                   compute: Compute, group: Group | None) -> TrainOutputs | None:
    train_df, val_df = data.train.frame, data.val.frame
    network = build_network(model_cfg, len(data.classes), train_cfg.seed)
    args = (data.root, train_df, val_df, list(data.classes), model_cfg, train_cfg, image_size,
            cache_dir)
    if group is not None and not group.is_main:  # a torchrun rank: rank 0 logs
        group.broadcast(None)  # rank 0 has opened the run
        train_model(*args, network=network, compute=compute, group=group)
        return None
    store.check_store()
    with tracking.start_run(run) as run_id:
        if group is not None:
            group.broadcast(run_id)
        tracking.log_manifest(data.train, "train", "training")
        tracking.log_manifest(data.val, "val", "val")
        log.info("training on %s (%s), %s, %d process(es)", compute.device,
                 compute.device_name, compute.precision, compute.nproc)
        if group is None and compute.nproc > 1:
            task = _WorkerTask(data.root, train_df, val_df, data.classes, model_cfg, train_cfg,
                               image_size, cache_dir, compute, run_id, Path())
            result = _train_distributed(task, network[0])
        else:
            logger = _RunLogger()
            result = train_model(*args, on_epoch=logger.epoch, on_step=logger.step,
                                 network=network, compute=compute, group=group)
        resolved = {
            "resolved.weights": result.weights_used,
            "resolved.precision": result.precision,
            **compute.as_params(),
            "resolved.training_path": result.path,
            "resolved.num_classes": len(data.classes),
            "resolved.train_images": len(train_df),
            "resolved.val_images": len(val_df),
            "resolved.keep": train_cfg.keep,
            "resolved.kept_epoch": result.kept_epoch,
        }
        tracking.log_params(resolved)
        # The descriptions people read in the UI: the experiment's and this run's.
        tracking.describe_experiment(tracking.active_experiment_id(), run.model_name)
        tracking.describe_run(run, {
            "data": f"{len(train_df)} train / {len(val_df)} validation images of "
                    f"{len(data.classes)} classes",
            "backbone weights": result.weights_used,
            "training": f"{result.path}, precision {result.precision}",
        })
        if result.feature_stats:  # an artifact, not metrics: keeps the metric charts clean
            tracking.log_dict(result.feature_stats, "training/feature_cache.json")
        tracking.log_dict({**compute.as_params(), "precision": result.precision,
                           **result.throughput}, "training/compute.json")
        history = pd.DataFrame(result.history)[["epoch", *SCORES]]
        curves = learning_curves(history)
        tracking.log_figure(curves, "training/learning_curves.png", DPI)
        card = ModelCard(
            arch=model_cfg.arch, classes=tuple(data.classes), image_size=image_size,
            head=head_spec(model_cfg), weights=result.weights_used, precision=result.precision,
            preprocessing=Preprocessing.for_size(image_size), run_id=run_id,
        )
        examples = [(data.root / p).read_bytes() for p in val_df["path"].head(2)]
        model_uri = store.store_call("log the model", pyfunc.log_model, result.model, card,
                                     examples)
        log.info("logged model %s", model_uri)
    return TrainOutputs(RunRef(run_id, run.name, model_uri), result.final, history, resolved,
                        curves)
