"""The fixed-shape training loop: ``train_one_epoch``, ``evaluate`` and ``fit`` (Adam(W), an
optional cosine schedule, ``train.keep``), the same for one process and for one rank of
several (a ``Group``: the metrics are summed over every rank's share).

It knows nothing of manifests, images or caches: ``pipeline.training`` builds the loaders
and the network and calls :func:`fit`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from pipeline.config import TrainConfig
from pipeline.distributed import Group
from pipeline.model.devices import autocast, needs_grad_scaler
from pipeline.model.network import set_train_mode
from pipeline.model.presets import normalize_batch

log = logging.getLogger(__name__)

StepCallback = Callable[[int, float], None]  # (global step, loss)
EpochCallback = Callable[[int, dict], None]  # (epoch, metrics)
CPU = torch.device("cpu")


def _inputs(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device``: uint8 images are normalised there, features just copied."""
    if x.dtype == torch.uint8:
        return normalize_batch(x, device)
    return x.to(device, non_blocking=True)


def inner_module(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(model, "module", model)


@dataclass(frozen=True)
class Steps:
    """How every step runs: what stays frozen (its BatchNorm in eval mode, also under a DDP
    wrapper), the precision, the device, and the process group (None: one process)."""

    freeze: str | None = None
    precision: str = "fp32"
    device: torch.device = CPU
    group: Group | None = None


@dataclass
class Update:
    """One optimiser step from a loss: scaled gradients with fp16 (steps skipped on
    overflow), then the per-step schedule."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def __call__(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    update: Update,
    steps: Steps = Steps(),
    *,
    step: int,
    log_every: int,
    on_step: StepCallback | None = None,
) -> tuple[dict, int]:
    """One pass over ``loader``; returns ({"train_loss": mean}, the global step after it).

    With a process group the loss is the mean over every rank's images (the step-level loss
    too: the mean of the ranks' equal shares of the global batch).
    """
    freeze, precision, device, group = steps.freeze, steps.precision, steps.device, steps.group
    model.train()
    set_train_mode(inner_module(model), freeze)  # frozen parts stay in eval mode, under DDP too
    criterion = nn.NLLLoss()
    total, count = 0.0, 0
    for x, y in loader:
        x, y = _inputs(x, device), y.to(device, non_blocking=True)
        with autocast(precision, device):
            out = model(x)
        loss = criterion(out.float(), y)
        update(loss)
        step += 1
        total += loss.item() * len(y)
        count += len(y)
        if step % log_every == 0:
            value = loss.item()
            if group is not None:  # every rank takes part, only rank 0 reports
                value = group.sum([value])[0] / group.world_size
            if on_step is not None:
                on_step(step, value)
    if group is not None:
        total, count = group.sum([total, count])
    return {"train_loss": total / max(count, 1)}, step


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, precision: str, device: torch.device = CPU,
             group: Group | None = None) -> dict:
    """Mean NLL loss and accuracy against the true labels; with a ``group``, over the
    union of the ranks' shards (the whole validation set)."""
    model.eval()
    criterion = nn.NLLLoss(reduction="sum")
    total, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = _inputs(x, device), y.to(device, non_blocking=True)
        with autocast(precision, device):
            out = model(x).float()
        total += criterion(out, y).item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    if group is not None:
        total, correct, count = group.sum([total, correct, count])
    return {"val_loss": total / max(count, 1), "val_accuracy": correct / max(count, 1)}


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the reference); AdamW, decoupled weight decay, when ``train.weight_decay`` > 0."""
    if cfg.weight_decay > 0:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr)


def kept_epoch(history: list[dict], keep: str) -> int:
    """The epoch whose weights ``train.keep`` keeps: the last, or the first best by
    validation accuracy."""
    if keep == "best":
        return max(history, key=lambda h: h["val_accuracy"])["epoch"]
    return history[-1]["epoch"]


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    cfg: TrainConfig,
    steps: Steps = Steps(),
    *,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
) -> list[dict]:
    """Adam(W) on the trainable parameters for ``cfg.epochs`` (per-step cosine schedule with
    ``train.scheduler: cosine``), each step as ``steps`` says; one history row per epoch.
    With ``train.keep: best`` the model ends with the weights of its best epoch
    (:func:`kept_epoch`)."""
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    scheduler = None
    if cfg.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, cfg.epochs * len(train_loader)))
    needs_scaler = needs_grad_scaler(steps.precision, steps.device)
    update = Update(optimizer, torch.amp.GradScaler("cuda") if needs_scaler else None,
                    scheduler)
    group = steps.group
    sampler = getattr(train_loader, "sampler", None)
    best: tuple[float, dict] | None = None
    history, step = [], 0
    for epoch in range(1, cfg.epochs + 1):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch - 1)  # a new shuffle each epoch, the same on every rank
        t0 = time.perf_counter()
        first_step = step
        train_m, step = train_one_epoch(model, train_loader, update, steps, step=step,
                                        log_every=cfg.log_every, on_step=on_step)
        train_s = time.perf_counter() - t0
        metrics = {**train_m, **evaluate(inner_module(model), val_loader, steps.precision,
                                         steps.device, group)}
        metrics["epoch_seconds"] = time.perf_counter() - t0
        metrics["seconds_per_step"] = train_s / max(step - first_step, 1)
        images = len(train_loader.sampler) * (group.world_size if group is not None else 1)
        metrics["train_images_per_second"] = images / train_s if train_s else 0.0
        if scheduler is not None:
            metrics["lr"] = scheduler.get_last_lr()[0]
        log.info(
            "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_accuracy %.4f  (%.1f s)",
            epoch, cfg.epochs, metrics["train_loss"], metrics["val_loss"],
            metrics["val_accuracy"], metrics["epoch_seconds"],
        )
        history.append({"epoch": epoch, **metrics})
        if cfg.keep == "best" and (best is None or metrics["val_accuracy"] > best[0]):
            state = inner_module(model).state_dict()
            best = (metrics["val_accuracy"], {k: v.detach().clone() for k, v in state.items()})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    if best is not None and kept_epoch(history, "best") != history[-1]["epoch"]:
        inner_module(model).load_state_dict(best[1])
        log.info("keeping the weights of epoch %d (best val_accuracy %.4f)",
                 kept_epoch(history, "best"), best[0])
    return history
