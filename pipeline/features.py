"""Feature extraction, in one place: the backbone features of a manifest's images through the
content-keyed cache, the ``torch.compile`` policy, and scoring a manifest with a trained
network (what ``evaluate`` does, without loading the pyfunc or the training code).

With a frozen backbone and no augmentation each image goes through the ResNet50 once, and
epochs and head-only sweeps reuse the stored features.

Key = (arch, sha256 of the backbone's weights and BatchNorm buffers, preprocessing spec,
device type, precision); inside it, one entry per image keyed by the sha256 of the file's
bytes. A change to any of these can never reuse stale features (CPU-fp32 features are never
mixed with GPU-bf16 ones). Stored as append-only ``shard-*.npz`` files, written atomically, so
concurrent runs (queued DVC experiments, the ranks of one DDP run) never corrupt it.

With several processes (``train.nproc``) each rank extracts its share of the missing images
and the ranks gather them, so every rank holds every feature.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.distributed import Group, cpu_cores
from pipeline.errors import PipelineError
from pipeline.hashing import sha256_bytes, sha256_file
from pipeline.model.card import ModelCard
from pipeline.model.devices import inference_precision
from pipeline.model.imaging import load_image
from pipeline.model.inference import INFERENCE_GRAPH, extract_features, inference_backbone
from pipeline.model.network import FoodNet, state_digest
from pipeline.model.presets import (
    Preprocessing,
    eval_pixels,
    eval_resize_crop,
    normalize_batch,
)
from pipeline.progress import progress

log = logging.getLogger(__name__)


class StaleManifestError(PipelineError):
    """An image no longer has the bytes its manifest recorded."""


def verified_digests(
    paths: Sequence[Path], expected: Sequence[str] | None = None
) -> list[str]:
    """sha256 of each file; where ``expected`` (a manifest's ``sha256`` column) names one,
    a file whose bytes differ stops the run: the manifests, and DVC's view of the data, are
    stale."""
    digests = [sha256_file(p) for p in paths]
    for path, got, want in zip(paths, digests, expected or [None] * len(paths), strict=True):
        if isinstance(want, str) and want and got != want:
            raise StaleManifestError(
                f"{path} changed after `sample` listed it (sha256 {want[:12]}... in the "
                f"manifest, {got[:12]}... now): the manifests are stale. Run `dvc repro` to "
                "re-sample, or `dvc checkout data/source` to restore the photos."
            )
    return digests


def cache_key(arch: str, backbone_digest: str, image_size: int, precision: str,
              device_type: str = "cpu") -> str:
    """The folder name for one (arch, weights, preprocessing, device type, precision)
    combination: the same images give slightly different features on another device or at
    another precision."""
    blob = json.dumps(
        {
            "arch": arch,
            "backbone": backbone_digest,
            "preprocessing": Preprocessing.for_size(image_size).as_dict(),
            "device": device_type,
            "precision": precision,
            "inference": INFERENCE_GRAPH,
        },
        sort_keys=True,
    )
    return (f"{arch}-{image_size}px-{device_type}-{precision}-"
            f"{sha256_bytes(blob.encode())[:16]}")


def loader_workers(requested: int | str, device_type: str, nproc: int = 1) -> int:
    """Decoding worker processes per training process for ``train.num_workers``.

    ``auto``: none on a CPU (measured on 2 cores: a worker competes with the compute threads,
    decoding between batches is faster; README "Feature cache"), and on a GPU the cores this
    process may use, less one for itself, up to 8 (the GPU waits on decoding otherwise).
    """
    if requested != "auto":
        return int(requested)
    if device_type == "cpu":
        return 0
    return max(1, min(8, cpu_cores() // max(nproc, 1) - 1))


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


class FeatureStore:
    """``digest -> [D] float32`` for one cache key, backed by shard files."""

    def __init__(self, cache_dir: Path, key: str):
        self.dir = Path(cache_dir) / key
        self._rows: dict[str, np.ndarray] | None = None

    def _load(self) -> dict[str, np.ndarray]:
        if self._rows is None:
            self._rows = {}
            for shard in sorted(self.dir.glob("shard-*.npz")):
                with np.load(shard) as z:
                    for d, f in zip(z["digests"].tolist(), z["features"], strict=True):
                        self._rows[d] = f
        return self._rows

    def get(self, digest: str) -> np.ndarray | None:
        return self._load().get(digest)

    def add(self, digests: Sequence[str], features: np.ndarray) -> None:
        """Write one new shard (atomically: temp file, then rename)."""
        if not len(digests):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
        os.close(fd)
        with open(tmp, "wb") as fh:
            np.savez(fh, digests=np.asarray(digests), features=features.astype(np.float32))
        os.replace(tmp, self.dir / f"shard-{uuid.uuid4().hex}.npz")
        rows = self._load()
        for d, f in zip(digests, features, strict=True):
            rows[d] = f


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


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


# Compiling costs seconds (more with a cold inductor cache) and pays back only over thousands
# of images (README: "Feature cache"; `make bench` measures it): a first run of the default
# sample extracts 10,000 (train+val in one call); the 1,000-image test set is not worth it.
COMPILE_MIN_IMAGES = 4000


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


def compute_features(
    backbone: nn.Module,
    paths: Sequence[Path],
    *,
    store: FeatureStore | None,
    image_size: int,
    precision: str,
    batch_size: int = 32,
    num_workers: int = 1,
    flush_every: int = 2048,
    expected_digests: Sequence[str] | None = None,
    compile: str = "auto",
    device: torch.device | str = "cpu",
    group: Group | None = None,
) -> tuple[np.ndarray, dict]:
    """Features [N,D] for ``paths`` (in order), computing only what ``store`` lacks, on
    ``device``.

    ``expected_digests``: the sha256 the manifest recorded for each path; an image whose
    bytes differ stops the run (the manifests, and so DVC's view of the data, are stale).
    ``compile``: ``auto`` (when at least :data:`COMPILE_MIN_IMAGES` are missing), ``always``
    or ``never``; see :func:`compiled_backbone`.

    ``backbone`` is the plain module (the cache key hashes its weights); extraction runs on
    its :func:`inference_backbone` copy.

    ``group``: with several processes, each rank computes every ``world_size``-th missing
    image and the ranks gather them (every rank returns all the features).

    Returns the features and stats: hits, misses, seconds, images/s of the extraction.
    """
    start = time.perf_counter()
    device = torch.device(device)
    digests = verified_digests(paths, expected_digests)
    cached = {d: store.get(d) for d in digests} if store is not None else {}
    todo = sorted({d: i for i, d in enumerate(digests) if cached.get(d) is None}.items(),
                  key=lambda kv: kv[1])
    if group is not None:  # every rank has read the cache before any rank adds to it
        group.barrier()
    mine = todo if group is None else todo[group.rank :: group.world_size]
    computed: dict[str, np.ndarray] = {}
    extract_s = 0.0
    compiled, compile_s = False, 0.0
    if mine:
        model = fused = inference_backbone(backbone, device)
        if compile == "always" or (compile == "auto" and len(mine) >= COMPILE_MIN_IMAGES):
            t0 = time.perf_counter()
            faster = compiled_backbone(fused, batch_size, image_size, precision, device)
            compiled, compile_s = faster is not None, time.perf_counter() - t0
            model = faster if faster is not None else fused
        loader = DataLoader(
            _ImageFiles([paths[i] for _, i in mine], image_size),
            batch_size=batch_size,
            **loader_options(num_workers, device),
        )
        pending_d: list[str] = []
        pending_f: list[np.ndarray] = []
        t0 = time.perf_counter()
        show = group is None or group.is_main
        with progress(len(mine), "features", disable=not show) as bar:
            done = 0
            for pixels in loader:
                n = len(pixels)
                x = normalize_batch(pixels, device)
                if compiled and n < batch_size:  # the compiled graph has a static batch size
                    x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
                feats = extract_features(model, x, precision)[:n].cpu().numpy()
                batch_digests = [d for d, _ in mine[done : done + n]]
                done += n
                computed.update(zip(batch_digests, feats, strict=True))
                pending_d += batch_digests
                pending_f.append(feats)
                if store is not None and len(pending_d) >= flush_every:
                    store.add(pending_d, np.concatenate(pending_f))
                    pending_d, pending_f = [], []
                bar.update(n)
        extract_s = time.perf_counter() - t0
        if store is not None and pending_d:
            store.add(pending_d, np.concatenate(pending_f))
    if group is not None and todo:
        t0 = time.perf_counter()
        own = (np.stack([computed[d] for d, _ in mine]) if mine
               else np.zeros((0, 0), np.float32))
        for rank, rows in enumerate(group.all_gather_rows(own)):
            computed.update(zip([d for d, _ in todo[rank :: group.world_size]], rows,
                                strict=True))
        extract_s += time.perf_counter() - t0
    rows = [cached.get(d) if cached.get(d) is not None else computed[d] for d in digests]
    feats = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    stats = {
        "images": len(paths),
        "cache_hits": len(paths) - len(todo),
        "cache_misses": len(todo),
        "extract_seconds": round(extract_s, 2),
        # all ranks together: each rank's share over its own extraction (and gathering) time
        "extract_images_per_second": (round(len(todo) / extract_s, 1) if extract_s
                                      else None),
        "device": str(device),
        "processes": 1 if group is None else group.world_size,
        "compiled": compiled,
        "compile_seconds": round(compile_s, 2),
        "seconds": round(time.perf_counter() - start, 2),
    }
    log.info(
        "features: %d images, %d from cache, %d computed%s",
        stats["images"], stats["cache_hits"], stats["cache_misses"],
        f" at {stats['extract_images_per_second']} img/s" if todo else "",
    )
    return feats, stats


def manifest_features(
    backbone: nn.Module,
    arch: str,
    root: Path,
    manifest: pd.DataFrame,
    *,
    image_size: int,
    precision: str,
    cache_dir: Path | None,
    batch_size: int,
    num_workers: int,
    compile: str = "auto",
    device: torch.device | str = "cpu",
    group: Group | None = None,
) -> tuple[np.ndarray, dict]:
    """[N,D] backbone features of a manifest's images (``root / path``), through the cache in
    ``cache_dir`` (None: no cache), on ``device``; each image is checked against the
    manifest's sha256."""
    device = torch.device(device)
    store = None
    if cache_dir is not None:
        key = cache_key(arch, state_digest(backbone), image_size, precision, device.type)
        store = FeatureStore(cache_dir, key)
    expected = manifest["sha256"].tolist() if "sha256" in manifest else None
    return compute_features(
        backbone, [root / p for p in manifest["path"]], store=store, image_size=image_size,
        precision=precision, batch_size=batch_size, num_workers=num_workers,
        expected_digests=expected, compile=compile, device=device, group=group,
    )


def score_manifest(
    net: FoodNet,
    card: ModelCard,
    root: Path,
    manifest: pd.DataFrame,
    *,
    cache_dir: Path | None,
    batch_size: int,
    num_workers: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """[N,C] class probabilities of a trained network on a manifest, via the feature cache:
    the logged model's own preprocessing and forward pass on ``device``, at the precision the
    logged model would use there (tested against the pyfunc)."""
    device = torch.device(device)
    feats, _ = manifest_features(
        net.backbone, card.arch, root, manifest, image_size=card.image_size,
        precision=inference_precision(card.precision, device), cache_dir=cache_dir,
        batch_size=batch_size, num_workers=num_workers, device=device,
    )
    head = net.head.to(device).eval()
    with torch.inference_mode():
        return head(torch.from_numpy(feats).to(device)).exp().cpu().numpy()
