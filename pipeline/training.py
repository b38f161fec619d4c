"""Transfer learning: the fixed-shape loop (``train_one_epoch`` / ``evaluate`` / ``fit``) and
``train_model``, which picks the fast path (cached backbone features, head only) whenever the
backbone is frozen and there is no augmentation.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pipeline.config import ModelConfig, TrainConfig
from pipeline.features import manifest_features, verified_digests
from pipeline.model.imaging import load_image
from pipeline.model.inference import autocast, resolve_precision
from pipeline.model.network import FoodNet, HeadSpec, apply_freeze, build_model, set_train_mode
from pipeline.model.presets import eval_transform, train_transform
from pipeline.model.weights import build_backbone

log = logging.getLogger(__name__)

StepCallback = Callable[[int, float], None]  # (global step, loss)
EpochCallback = Callable[[int, dict], None]  # (epoch, metrics)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class LabeledImages(Dataset):
    """(image tensor [3,S,S], class index) pairs from a manifest."""

    def __init__(self, root: Path, manifest: pd.DataFrame, transform, image_size: int):
        self.paths = [root / p for p in manifest["path"]]
        self.labels = manifest["class_index"].astype(int).tolist()
        self.transform = transform
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = load_image(self.paths[i], min_side=self.image_size)
        return self.transform(img), self.labels[i]


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    *,
    freeze: str | None,
    precision: str,
    log_every: int,
    step: int,
    on_step: StepCallback | None = None,
) -> tuple[dict, int]:
    """One pass over ``loader``; returns ({"train_loss": mean}, the global step after it)."""
    set_train_mode(model, freeze)
    criterion = nn.NLLLoss()
    total, count = 0.0, 0
    for x, y in loader:
        with autocast(precision):
            out = model(x)
        loss = criterion(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        total += loss.item() * len(y)
        count += len(y)
        if on_step is not None and step % log_every == 0:
            on_step(step, loss.item())
    return {"train_loss": total / max(count, 1)}, step


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DataLoader, precision: str) -> dict:
    """Mean NLL loss and accuracy against the true labels."""
    model.eval()
    criterion = nn.NLLLoss(reduction="sum")
    total, correct, count = 0.0, 0, 0
    for x, y in loader:
        with autocast(precision):
            out = model(x).float()
        total += criterion(out, y).item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    return {"val_loss": total / max(count, 1), "val_accuracy": correct / max(count, 1)}


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    cfg: TrainConfig,
    *,
    freeze: str | None,
    precision: str,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
) -> list[dict]:
    """Adam on the trainable parameters for ``cfg.epochs``; one history row per epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    history, step = [], 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_m, step = train_one_epoch(
            model, train_loader, optimizer, freeze=freeze, precision=precision,
            log_every=cfg.log_every, step=step, on_step=on_step,
        )
        metrics = {**train_m, **evaluate(model, val_loader, precision)}
        metrics["epoch_seconds"] = time.perf_counter() - t0
        log.info(
            "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_accuracy %.4f  (%.1f s)",
            epoch, cfg.epochs, metrics["train_loss"], metrics["val_loss"],
            metrics["val_accuracy"], metrics["epoch_seconds"],
        )
        history.append({"epoch": epoch, **metrics})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return history


@dataclass
class TrainResult:
    model: FoodNet
    history: list[dict]
    precision: str
    weights_used: str
    path: str  # "cached-features" or "end-to-end"
    feature_stats: dict = field(default_factory=dict)

    @property
    def final(self) -> dict:
        last = self.history[-1]
        return {k: last[k] for k in ("train_loss", "val_loss", "val_accuracy")}


def _lone_last_batch(n: int, batch_size: int) -> bool:
    """A final batch of one image breaks BatchNorm in train mode: drop just that one."""
    return n > batch_size and n % batch_size == 1


def uses_feature_cache(model_cfg: ModelConfig, train_cfg: TrainConfig) -> bool:
    """Features can be cached only when the backbone never changes and inputs are fixed."""
    return model_cfg.freeze == "backbone" and not train_cfg.augment


def head_spec(model_cfg: ModelConfig) -> HeadSpec:
    """The head settings of ``model`` params, as the model card records them."""
    return HeadSpec(hidden=model_cfg.hidden, dropout=model_cfg.dropout,
                    feature_norm=model_cfg.feature_norm)


def build_network(model_cfg: ModelConfig, num_classes: int, seed: int) -> tuple[FoodNet, str]:
    """The network to train and a description of its starting weights: the backbone (its
    weights are loaded first, so a missing file or offline ImageNet stops here, before any
    run is opened), a fresh head seeded by ``seed``, frozen as ``model.freeze`` says."""
    backbone, weights_used = build_backbone(model_cfg.arch, model_cfg.weights,
                                            model_cfg.init_seed)
    seed_everything(seed)
    model = build_model(model_cfg.arch, num_classes, head_spec(model_cfg), backbone)
    apply_freeze(model, model_cfg.freeze)
    return model, weights_used


def train_model(
    root: Path,
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    classes: list[str],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    image_size: int,
    cache_dir: Path | None,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
    network: tuple[FoodNet, str] | None = None,
) -> TrainResult:
    """Train the network (``network`` from :func:`build_network`, built here when None) on
    the manifests."""
    precision = resolve_precision(train_cfg.precision)
    model, weights_used = network or build_network(model_cfg, len(classes), train_cfg.seed)
    backbone = model.backbone
    generator = torch.Generator().manual_seed(train_cfg.seed)
    y_train = torch.tensor(train_df["class_index"].to_numpy(), dtype=torch.long)
    y_val = torch.tensor(val_df["class_index"].to_numpy(), dtype=torch.long)
    stats: dict = {}
    if uses_feature_cache(model_cfg, train_cfg):
        backbone.to(memory_format=torch.channels_last).eval()
        common = dict(
            image_size=image_size, precision=precision, cache_dir=cache_dir,
            batch_size=train_cfg.feature_batch_size, num_workers=train_cfg.num_workers,
            compile=train_cfg.compile,
        )
        # One call for both splits: one model preparation (and compile) for all misses.
        both = pd.concat([train_df, val_df], ignore_index=True)
        feats, s_both = manifest_features(backbone, model_cfg.arch, root, both, **common)
        f_train, f_val = feats[: len(train_df)], feats[len(train_df) :]
        stats = {"train+val": s_both}
        # Same dropout masks and batch order whether the features came from the cache or not
        # (DataLoader workers draw from the global RNG).
        generator = seed_everything(train_cfg.seed)
        train_loader = DataLoader(
            TensorDataset(torch.from_numpy(f_train), y_train),
            batch_size=train_cfg.batch_size, shuffle=True, generator=generator,
            drop_last=_lone_last_batch(len(train_df), train_cfg.batch_size),
        )
        val_loader = DataLoader(TensorDataset(torch.from_numpy(f_val), y_val), batch_size=512)
        # The head alone trains on the cached features, in fp32.
        history = fit(model.head, train_loader, val_loader, train_cfg, freeze=None,
                      precision="fp32", on_epoch=on_epoch, on_step=on_step)
        path = "cached-features"
    else:
        for df in (train_df, val_df):  # the cached path checks them as it hashes for the cache
            verified_digests([root / p for p in df["path"]], df["sha256"].tolist())
        model.to(memory_format=torch.channels_last)
        train_tf = train_transform(image_size) if train_cfg.augment else eval_transform(image_size)
        loader_args = dict(num_workers=train_cfg.num_workers)
        train_loader = DataLoader(
            LabeledImages(root, train_df, train_tf, image_size),
            batch_size=train_cfg.batch_size, shuffle=True, generator=generator,
            drop_last=_lone_last_batch(len(train_df), train_cfg.batch_size), **loader_args,
        )
        val_loader = DataLoader(
            LabeledImages(root, val_df, eval_transform(image_size), image_size),
            batch_size=train_cfg.feature_batch_size, **loader_args,
        )
        history = fit(model, train_loader, val_loader, train_cfg, freeze=model_cfg.freeze,
                      precision=precision, on_epoch=on_epoch, on_step=on_step)
        path = "end-to-end"
    model.eval()
    return TrainResult(model, history, precision, weights_used, path, stats)
