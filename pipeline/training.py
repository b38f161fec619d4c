"""Transfer learning: ``train_model`` builds the network and its loaders and runs the loop of
``pipeline.loop`` on the path it picks: cached backbone features, head only, whenever the
backbone is frozen and there is no augmentation; otherwise end to end (the fine-tuning path:
``model.freeze: layer4 | none``, ``train.augment``).

What to train and where is one :class:`TrainJob`, resolved before any work. Given a ``Group``
(this process is one rank of several that torchrun started, ``pipeline.distributed``), the
same code runs standard DDP: each rank extracts its share of the features, trains on its
share of every global batch (a ``DistributedSampler``; gradients all-reduced by
``DistributedDataParallel``; ``SyncBatchNorm`` on GPUs, per-rank BatchNorm on CPUs), and the
metrics are summed over all ranks, so they describe the whole validation set. The result is
that of one process up to the batch order and BatchNorm statistics (tested: within 0.02
validation accuracy).
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from pipeline.compute import Compute, resolve_compute
from pipeline.config import ModelConfig, Params, TrainConfig
from pipeline.distributed import Group, sync_batchnorm_supported
from pipeline.features.cache import verified_digests
from pipeline.features.extract import Extraction, loader_options, manifest_features
from pipeline.handoffs import Manifest
from pipeline.loop import CPU, EpochCallback, StepCallback, Steps, fit, inner_module, kept_epoch
from pipeline.model.imaging import load_image
from pipeline.model.network import FoodNet, HeadSpec, apply_freeze, build_model
from pipeline.model.presets import eval_pixels, eval_resize_crop, train_resize_crop
from pipeline.model.weights import build_backbone

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator for data shuffling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class TrainData:
    """What ``sample`` and ``split`` produced: the image root, class order and manifests."""

    root: Path
    classes: tuple[str, ...]
    train: Manifest
    val: Manifest


@dataclass(frozen=True)
class TrainJob:
    """A resolved training job: what data, which model, how to train, where to compute,
    where the feature cache is (None: no cache), at which image size."""

    data: TrainData
    model: ModelConfig
    train: TrainConfig
    compute: Compute
    image_size: int
    cache_dir: Path | None = None

    @classmethod
    def from_params(cls, params: Params, data: TrainData, cache_dir: Path | None,
                    compute: Compute | None = None) -> TrainJob:
        """The job ``params`` describe; ``compute`` resolved here when not given."""
        compute = compute or resolve_compute(params.compute, params.train.precision)
        return cls(data, params.model, params.train, compute, params.data.image_size,
                   cache_dir)

class LabeledImages(Dataset):
    """(pixels [S,S,3] uint8, class index) pairs from a manifest, after ``geometry`` (the
    eval or train preset's resize/crop); normalised per batch, on the device."""

    def __init__(self, root: Path, manifest: pd.DataFrame, geometry, image_size: int):
        self.paths = [root / p for p in manifest["path"]]
        self.labels = manifest["class_index"].astype(int).tolist()
        self.geometry = geometry
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        img = load_image(self.paths[i], min_side=self.image_size)  # JPEG draft decoding
        return eval_pixels(img, self.geometry), self.labels[i]


@dataclass
class TrainResult:
    model: FoodNet  # on the CPU, in eval mode, with the kept epoch's weights
    history: list[dict]
    precision: str
    weights_used: str
    path: str  # "cached-features" or "end-to-end"
    feature_stats: dict = field(default_factory=dict)
    keep: str = "last"
    throughput: dict = field(default_factory=dict)  # images/s, s/step, GPU memory peak

    @property
    def kept_epoch(self) -> int:
        return kept_epoch(self.history, self.keep)

    @property
    def final(self) -> dict:
        """The metrics of the epoch whose weights were kept."""
        row = next(h for h in self.history if h["epoch"] == self.kept_epoch)
        return {k: row[k] for k in ("train_loss", "val_loss", "val_accuracy")}


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


def _train_loader(dataset: Dataset, batch_size: int, generator: torch.Generator,
                  group: Group | None, seed: int, **options) -> DataLoader:
    """Shuffled batches of ``batch_size`` (per process); with a ``group``, this rank's share
    of a seeded shuffle (``DistributedSampler``, a new order each epoch)."""
    if group is None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                          drop_last=_lone_last_batch(len(dataset), batch_size), **options)
    sampler = DistributedSampler(dataset, num_replicas=group.world_size, rank=group.rank,
                                 shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=generator,
                      drop_last=_lone_last_batch(len(sampler), batch_size), **options)


def _shard(dataset: Dataset, group: Group | None) -> Dataset:
    """This rank's share of an evaluation set: every world_size-th item, nothing repeated
    (the metrics are summed over the ranks)."""
    if group is None:
        return dataset
    return Subset(dataset, range(group.rank, len(dataset), group.world_size))


def _ddp(module: nn.Module, group: Group | None) -> nn.Module:
    """``module`` wrapped by DistributedDataParallel (gradients all-reduced); where the
    backend supports it (GPUs) a copy of it with ``SyncBatchNorm`` (statistics over the
    global batch), so the model itself keeps plain BatchNorm layers."""
    if group is None:
        return module
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm_supported(group.device.type):
        module = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(module))
    ids = [group.device.index] if group.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def per_process_batch(batch_size: int, group: Group | None) -> int:
    """``train.batch_size`` is the global batch: each of N processes takes batch_size // N."""
    if group is None:
        return batch_size
    if batch_size % group.world_size and group.is_main:
        log.warning("train.batch_size=%d is not a multiple of %d processes: global batches "
                    "of %d", batch_size, group.world_size,
                    batch_size // group.world_size * group.world_size)
    return max(1, batch_size // group.world_size)


@dataclass(frozen=True)
class _Loaders:
    train: DataLoader
    val: DataLoader


def _cached_loaders(job: TrainJob, backbone: nn.Module, device: torch.device,
                    group: Group | None, stats: dict) -> _Loaders:
    """Loaders of cached backbone features [D] and labels (the head-only path)."""
    train_df, val_df = job.data.train.frame, job.data.val.frame
    backbone.to(memory_format=torch.channels_last).eval()
    how = Extraction.on(job.compute, device, job.image_size, job.compute.precision)
    # One call for both splits: one model preparation (and compile) for all misses.
    both = pd.concat([train_df, val_df], ignore_index=True)
    feats, stats["train+val"] = manifest_features(backbone, job.model.arch, job.data.root,
                                                  both, how, job.cache_dir, group)
    f_train, f_val = feats[: len(train_df)], feats[len(train_df) :]
    # Same dropout masks and batch order whether the features came from the cache or not
    # (DataLoader workers draw from the global RNG).
    generator = seed_everything(job.train.seed)
    pin = {"pin_memory": True} if device.type == "cuda" else {}
    train = _train_loader(TensorDataset(torch.from_numpy(f_train), _labels(train_df)),
                          per_process_batch(job.train.batch_size, group), generator, group,
                          job.train.seed, **pin)
    val = DataLoader(_shard(TensorDataset(torch.from_numpy(f_val), _labels(val_df)), group),
                     batch_size=512, pin_memory=device.type == "cuda")
    return _Loaders(train, val)


def _image_loaders(job: TrainJob, device: torch.device, group: Group | None) -> _Loaders:
    """Loaders of decoded images [S,S,3] uint8 and labels (the end-to-end path)."""
    train_df, val_df, root, size = (job.data.train.frame, job.data.val.frame, job.data.root,
                                    job.image_size)
    for df in (train_df, val_df):  # the cached path checks them as it hashes for the cache
        verified_digests([root / p for p in df["path"]], df["sha256"].tolist())
    geometry = train_resize_crop(size) if job.train.augment else eval_resize_crop(size)
    options = loader_options(job.compute.num_workers, device, persistent=True)
    generator = torch.Generator().manual_seed(job.train.seed)
    train = _train_loader(LabeledImages(root, train_df, geometry, size),
                          per_process_batch(job.train.batch_size, group), generator, group,
                          job.train.seed, **options)
    val = DataLoader(_shard(LabeledImages(root, val_df, eval_resize_crop(size), size), group),
                     batch_size=job.compute.feature_batch_size, **options)
    return _Loaders(train, val)


def _labels(df: pd.DataFrame) -> torch.Tensor:
    return torch.tensor(df["class_index"].to_numpy(), dtype=torch.long)


def train_model(
    job: TrainJob,
    *,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
    network: tuple[FoodNet, str] | None = None,
    group: Group | None = None,
) -> TrainResult:
    """Train the network (``network`` from :func:`build_network`, built here when None) as
    ``job`` says; ``group``: this process is one rank of a DDP run (its device is the
    group's)."""
    device = group.device if group is not None else torch.device(job.compute.device)
    model, weights_used = network or build_network(job.model, len(job.data.classes),
                                                   job.train.seed)
    stats: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if uses_feature_cache(job.model, job.train):
        loaders = _cached_loaders(job, model.backbone, device, group, stats)
        # The head alone trains on the cached features, in fp32.
        trained, freeze, precision = model.head.to(device), None, "fp32"
        path = "cached-features"
    else:
        model.to(device=device, memory_format=torch.channels_last)
        loaders = _image_loaders(job, device, group)
        trained, freeze, precision = model, job.model.freeze, job.compute.precision
        path = "end-to-end"
    wrapped = _ddp(trained, group)
    history = fit(wrapped, loaders.train, loaders.val, job.train,
                  Steps(freeze, precision, device, group), on_epoch=on_epoch, on_step=on_step)
    if inner_module(wrapped) is not trained:  # SyncBatchNorm trained a copy: take its weights
        trained.load_state_dict(inner_module(wrapped).state_dict())
    throughput = {
        "train_images_per_second": [round(h["train_images_per_second"], 1) for h in history],
        "seconds_per_step": [round(h["seconds_per_step"], 4) for h in history],
    }
    if device.type == "cuda":
        throughput["gpu_memory_peak_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    model.to(CPU).eval()  # logged from the CPU
    return TrainResult(model, history, job.compute.precision, weights_used, path, stats,
                       job.train.keep, throughput)
