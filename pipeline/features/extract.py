"""Extracting backbone features on a device: the DataLoader policy, the ``torch.compile``
policy, and :func:`manifest_features`, which computes only what the cache lacks.

With several processes (``compute.nproc``) each rank extracts its share of the missing images
and the ranks gather them, so every rank holds every feature.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.compute import Compute
from pipeline.distributed import Group
from pipeline.features.cache import FeatureStore, cache_key, verified_digests
from pipeline.features.compiling import CompilePolicy
from pipeline.model.imaging import load_image
from pipeline.model.inference import inference_backbone
from pipeline.model.network import state_digest
from pipeline.model.presets import eval_pixels, eval_resize_crop, normalize_batch
from pipeline.progress import progress

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
FLUSH_EVERY = 2048  # features written to the cache per shard, at most

@dataclass(frozen=True)
class Extraction:
    """How features are extracted. ``image_size``, ``precision`` and the device type decide
    the features (and key the cache); the batch size, decoding workers and ``compile``
    (``auto``: when a timed probe says it pays, :mod:`pipeline.features.compiling`;
    ``always``; ``never``) change only the speed."""

    image_size: int
    precision: str
    device: torch.device | str = CPU
    batch_size: int = 32
    num_workers: int = 1
    compile: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))  # "cpu" is fine too

    @classmethod
    def on(cls, compute: Compute, device: torch.device | str, image_size: int,
           precision: str) -> Extraction:
        """The extraction settings of ``compute`` on ``device``, at ``precision``."""
        return cls(image_size, precision, device, compute.feature_batch_size,
                   compute.num_workers, compute.compile)


@dataclass(frozen=True)
class LazyBackbone:
    """A backbone known by the digest of its weights (what keys the cache), built only when
    an image misses the cache: building one imports torchvision, ~1.1 s a process
    (pipeline/model/network.py), which scoring features that are all cached need not pay."""

    digest: str
    build: Callable[[], nn.Module]


def loader_options(num_workers: int, device: torch.device, *, persistent: bool = False
                   ) -> dict:
    """DataLoader settings that feed a device: pinned memory (for ``non_blocking`` copies)
    on CUDA, one torch thread per decoding worker, workers kept across epochs."""
    return dict(
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_one_thread if num_workers else None,
        persistent_workers=persistent and num_workers > 0,
    )


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


class _ImageFiles(Dataset):
    """Decoded, resized and cropped images: [S,S,3] uint8 pixels (normalised per batch)."""

    def __init__(self, paths: Sequence[Path], image_size: int):
        self.paths = list(paths)
        self.image_size = image_size
        self.resize_crop = eval_resize_crop(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return eval_pixels(load_image(self.paths[i], min_side=self.image_size), self.resize_crop)


@dataclass
class _Extracted:
    """What one process computed: ``digest -> [D]`` features, and how long it took: the
    whole loop (decoding included) and the forward passes alone."""

    features: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    forward_seconds: float = 0.0
    compiled: bool = False
    compile_seconds: float = 0.0
    compile_decision: str = ""


def _extract(backbone: nn.Module, todo: list[tuple[str, Path]], how: Extraction,
             store: FeatureStore | None, main: bool) -> _Extracted:
    """Features of the ``(digest, path)`` pairs, written to ``store`` every
    :data:`FLUSH_EVERY` images; ``main`` (the only process, or rank 0 of several): a
    progress bar, and it notes its speed in the machine's compile record."""
    out = _Extracted()
    if not todo:
        return out
    policy = CompilePolicy(inference_backbone(backbone, how.device), len(todo), how.compile,
                           how.device, how.precision, how.image_size, how.batch_size,
                           note=main)
    loader = DataLoader(_ImageFiles([p for _, p in todo], how.image_size),
                        batch_size=how.batch_size, **loader_options(how.num_workers, how.device))
    pending_d: list[str] = []
    pending_f: list[np.ndarray] = []
    t0 = time.perf_counter()
    with progress(len(todo), "features", disable=not main) as bar:
        done = 0
        for pixels in loader:
            n = len(pixels)
            feats, seconds = policy.forward(normalize_batch(pixels, how.device), n)
            pending_f.append(feats)
            if policy.redone is not None:  # compiled after the probe: its batches too
                pending_f[: len(policy.redone)] = policy.redone
                policy.redone = None
            out.forward_seconds += seconds
            pending_d += [d for d, _ in todo[done : done + n]]
            done += n
            # nothing is kept while probing: the probe's features may yet be redone
            if len(pending_d) >= FLUSH_EVERY and not policy.deciding:
                _keep(out, store, pending_d, pending_f)
                pending_d, pending_f = [], []
            bar.update(n)
    out.seconds = time.perf_counter() - t0 - policy.compile_seconds_in_loop
    policy.finish()
    out.compiled, out.compile_seconds = policy.compiled, policy.compile_seconds
    out.compile_decision = policy.decision
    if pending_d:
        _keep(out, store, pending_d, pending_f)
    return out


def _keep(out: _Extracted, store: FeatureStore | None, digests: list[str],
          batches: list[np.ndarray]) -> None:
    """One block of features: a shard of ``store`` and ``out``'s rows are the same memory
    (at Food-101's size, 75,750 x 2048 floats are 620 MB: one copy, not two)."""
    block = np.concatenate(batches)
    if store is not None:
        store.add(digests, block)
    out.features.update(zip(digests, block, strict=True))


def _gathered(group: Group, todo: list[tuple[str, int]], mine: list[tuple[str, int]],
              computed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every rank's share of ``todo`` (rank r computed every world_size-th, from r)."""
    own = np.stack([computed[d] for d, _ in mine]) if mine else np.zeros((0, 0), np.float32)
    out = dict(computed)
    for rank, rows in enumerate(group.all_gather_rows(own)):
        out.update(zip([d for d, _ in todo[rank :: group.world_size]], rows, strict=True))
    return out


def compute_features(
    backbone: nn.Module | LazyBackbone,
    paths: Sequence[Path],
    how: Extraction,
    *,
    store: FeatureStore | None = None,
    expected_digests: Sequence[str] | None = None,
    group: Group | None = None,
) -> tuple[np.ndarray, dict]:
    """Features [N,D] for ``paths`` (in order), computing only what ``store`` lacks, as
    ``how`` says.

    ``expected_digests``: the sha256 the manifest recorded for each path; an image whose
    bytes differ stops the run (the manifests, and so DVC's view of the data, are stale).
    ``backbone`` is the plain module (the cache key hashes its weights); extraction runs on
    its :func:`inference_backbone` copy; a :class:`LazyBackbone` is built only if this
    process has images to compute. ``group``: with several processes, each rank
    computes every ``world_size``-th missing image and the ranks gather them (every rank
    returns all the features).

    Returns the features and stats: hits, misses, seconds, images/s of the extraction.
    """
    start = time.perf_counter()
    digests = verified_digests(paths, expected_digests)
    cached = {d: store.get(d) for d in digests} if store is not None else {}
    todo = sorted({d: i for i, d in enumerate(digests) if cached.get(d) is None}.items(),
                  key=lambda kv: kv[1])
    if group is not None:  # every rank has read the cache before any rank adds to it
        group.barrier()
    mine = todo if group is None else todo[group.rank :: group.world_size]
    if isinstance(backbone, LazyBackbone) and mine:
        backbone = backbone.build()
    run = _extract(backbone, [(d, paths[i]) for d, i in mine], how, store,
                   main=group is None or group.is_main)
    computed = run.features
    if group is not None and todo:
        t0 = time.perf_counter()
        computed = _gathered(group, todo, mine, computed)
        run.seconds += time.perf_counter() - t0
    rows = [cached.get(d) if cached.get(d) is not None else computed[d] for d in digests]
    feats = (np.stack(rows).astype(np.float32, copy=False) if rows
             else np.zeros((0, 0), np.float32))
    stats = {
        "images": len(paths),
        "cache_hits": len(paths) - len(todo),
        "cache_misses": len(todo),
        "extract_seconds": round(run.seconds, 2),
        # the network's forward passes alone (the rest of extract_seconds is decoding)
        "forward_seconds": round(run.forward_seconds, 2),
        # all ranks together: each rank's share over its own extraction (and gathering) time
        "extract_images_per_second": (round(len(todo) / run.seconds, 1) if run.seconds
                                      else None),
        "device": str(how.device),
        "processes": 1 if group is None else group.world_size,
        "compiled": run.compiled,
        "compile_seconds": round(run.compile_seconds, 2),
        "compile_decision": run.compile_decision,
        "seconds": round(time.perf_counter() - start, 2),
    }
    log.info(
        "features: %d images, %d from cache, %d computed%s",
        stats["images"], stats["cache_hits"], stats["cache_misses"],
        f" at {stats['extract_images_per_second']} img/s (forward passes "
        f"{stats['forward_seconds']} s of {stats['extract_seconds']} s)" if todo else "",
    )
    return feats, stats


def manifest_features(backbone: nn.Module | LazyBackbone, arch: str, root: Path,
                      manifest: pd.DataFrame, how: Extraction, cache_dir: Path | None,
                      group: Group | None = None) -> tuple[np.ndarray, dict]:
    """[N,D] backbone features of a manifest's images (``root / path``), through the cache in
    ``cache_dir`` (None: no cache); each image is checked against the manifest's sha256."""
    store = None
    if cache_dir is not None:
        digest = (backbone.digest if isinstance(backbone, LazyBackbone)
                  else state_digest(backbone))
        key = cache_key(arch, digest, how.image_size, how.precision, how.device.type)
        store = FeatureStore(cache_dir, key)
    expected = manifest["sha256"].tolist() if "sha256" in manifest else None
    return compute_features(backbone, [root / p for p in manifest["path"]], how, store=store,
                            expected_digests=expected, group=group)
