"""Extracting backbone features on a device: the DataLoader policy, the ``torch.compile``
policy, and :func:`manifest_features`, which computes only what the cache lacks.

With several processes (``compute.nproc``) each rank extracts its share of the missing images
and the ranks gather them, so every rank holds every feature.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
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
from pipeline.model.imaging import load_image
from pipeline.model.inference import extract_features, inference_backbone
from pipeline.model.network import state_digest
from pipeline.model.presets import eval_pixels, eval_resize_crop, normalize_batch
from pipeline.progress import progress

log = logging.getLogger(__name__)

CPU = torch.device("cpu")
FLUSH_EVERY = 2048  # features written to the cache per shard, at most

# Compiling costs seconds (more with a cold inductor cache) and pays back only over thousands
# of images (docs/gpus.md "The feature cache and `torch.compile`", docs/figures.md; `make
# bench` measures it): a first run of the default sample extracts 10,000 (train+val in one
# call); the 1,000-image test set is not worth it.
COMPILE_MIN_IMAGES = 4000


@dataclass(frozen=True)
class Extraction:
    """How features are extracted. ``image_size``, ``precision`` and the device type decide
    the features (and key the cache); the batch size, decoding workers and ``compile``
    (``auto``: when at least :data:`COMPILE_MIN_IMAGES` miss; ``always``; ``never``) change
    only the speed."""

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


def compiled_backbone(fused: nn.Module, batch_size: int, image_size: int,
                      precision: str, device: torch.device | str = "cpu") -> nn.Module | None:
    """``fused`` compiled by torch.compile (inductor, frozen weights, static shapes) and run
    once on a dummy batch; None, with a warning, where compiling fails (no C++ compiler...).

    Only the execution changes: the compiled graph computes the same features as the eager
    one (a test compares them), so the cache key does not depend on it.
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights become constants: prepacked for oneDNN
    # A CUDA build of torch on a CPU-only machine warns "No CUDA runtime is found" when
    # inductor sets up its C++ toolchain; it compiles for the CPU either way.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    try:
        model = torch.compile(fused, dynamic=False)
        dummy = normalize_batch(np.zeros((batch_size, image_size, image_size, 3), np.uint8),
                                device)
        extract_features(model, dummy, precision)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, keep going
        first_line = (str(exc).splitlines() or [""])[0]
        log.warning("torch.compile failed (%s: %s); extracting without it (set "
                    "compute.compile=never to skip trying)", type(exc).__name__, first_line)
        return None
    log.info("backbone compiled for extraction in %.1f s", time.perf_counter() - t0)
    return model


@dataclass
class _Extracted:
    """What one process computed: ``digest -> [D]`` features, and how long it took: the
    whole loop (decoding included) and the forward passes alone."""

    features: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    forward_seconds: float = 0.0
    compiled: bool = False
    compile_seconds: float = 0.0


def _model_for(backbone: nn.Module, images: int, how: Extraction
               ) -> tuple[nn.Module, bool, float]:
    """The module that extracts ``images`` images: the BatchNorm-folded inference copy of
    ``backbone``, compiled when ``how.compile`` says so; whether it is, and the seconds."""
    fused = inference_backbone(backbone, how.device)
    if how.compile == "never" or (how.compile == "auto" and images < COMPILE_MIN_IMAGES):
        return fused, False, 0.0
    t0 = time.perf_counter()
    faster = compiled_backbone(fused, how.batch_size, how.image_size, how.precision, how.device)
    if faster is None:
        return fused, False, time.perf_counter() - t0
    return faster, True, time.perf_counter() - t0


def _extract(backbone: nn.Module, todo: list[tuple[str, Path]], how: Extraction,
             store: FeatureStore | None, show: bool) -> _Extracted:
    """Features of the ``(digest, path)`` pairs, written to ``store`` every
    :data:`FLUSH_EVERY` images; ``show``: a progress bar."""
    out = _Extracted()
    if not todo:
        return out
    model, out.compiled, out.compile_seconds = _model_for(backbone, len(todo), how)
    loader = DataLoader(_ImageFiles([p for _, p in todo], how.image_size),
                        batch_size=how.batch_size, **loader_options(how.num_workers, how.device))
    pending_d: list[str] = []
    pending_f: list[np.ndarray] = []
    t0 = time.perf_counter()
    with progress(len(todo), "features", disable=not show) as bar:
        done = 0
        for pixels in loader:
            n = len(pixels)
            x = normalize_batch(pixels, how.device)
            if out.compiled and n < how.batch_size:  # the compiled graph has a static batch
                x = torch.cat([x, x.new_zeros((how.batch_size - n, *x.shape[1:]))])
            t1 = time.perf_counter()
            pending_f.append(extract_features(model, x, how.precision)[:n].cpu().numpy())
            out.forward_seconds += time.perf_counter() - t1  # .cpu() waits for the device
            pending_d += [d for d, _ in todo[done : done + n]]
            done += n
            if len(pending_d) >= FLUSH_EVERY:
                _keep(out, store, pending_d, pending_f)
                pending_d, pending_f = [], []
            bar.update(n)
    out.seconds = time.perf_counter() - t0
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
    backbone: nn.Module,
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
    its :func:`inference_backbone` copy. ``group``: with several processes, each rank
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
    run = _extract(backbone, [(d, paths[i]) for d, i in mine], how, store,
                   show=group is None or group.is_main)
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
        "seconds": round(time.perf_counter() - start, 2),
    }
    log.info(
        "features: %d images, %d from cache, %d computed%s",
        stats["images"], stats["cache_hits"], stats["cache_misses"],
        f" at {stats['extract_images_per_second']} img/s (forward passes "
        f"{stats['forward_seconds']} s of {stats['extract_seconds']} s)" if todo else "",
    )
    return feats, stats


def manifest_features(backbone: nn.Module, arch: str, root: Path, manifest: pd.DataFrame,
                      how: Extraction, cache_dir: Path | None, group: Group | None = None
                      ) -> tuple[np.ndarray, dict]:
    """[N,D] backbone features of a manifest's images (``root / path``), through the cache in
    ``cache_dir`` (None: no cache); each image is checked against the manifest's sha256."""
    store = None
    if cache_dir is not None:
        key = cache_key(arch, state_digest(backbone), how.image_size, how.precision,
                        how.device.type)
        store = FeatureStore(cache_dir, key)
    expected = manifest["sha256"].tolist() if "sha256" in manifest else None
    return compute_features(backbone, [root / p for p in manifest["path"]], how, store=store,
                            expected_digests=expected, group=group)
