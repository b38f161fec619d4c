"""Backbone feature cache: with a frozen backbone and no augmentation, each image goes
through the ResNet50 once, and epochs and head-only sweeps reuse the stored features.

Key = (arch, sha256 of the backbone's weights and BatchNorm buffers, preprocessing spec,
precision); inside it, one entry per image keyed by the sha256 of the file's bytes. A change
to any of these can never reuse stale features. Stored as append-only ``shard-*.npz`` files,
written atomically, so concurrent runs (queued DVC experiments) never corrupt it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.imaging import load_image
from pipeline.modeling import (
    INFERENCE_GRAPH,
    eval_transform,
    extract_features,
    inference_backbone,
    preprocessing_spec,
)

log = logging.getLogger(__name__)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(arch: str, backbone_digest: str, image_size: int, precision: str) -> str:
    """The folder name for one (arch, weights, preprocessing, precision) combination."""
    blob = json.dumps(
        {
            "arch": arch,
            "backbone": backbone_digest,
            "preprocessing": preprocessing_spec(image_size),
            "precision": precision,
            "inference": INFERENCE_GRAPH,
        },
        sort_keys=True,
    )
    return f"{arch}-{image_size}px-{precision}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


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
    """Decoded, eval-preprocessed images: [3,S,S] float tensors."""

    def __init__(self, paths: Sequence[Path], image_size: int):
        self.paths = list(paths)
        self.image_size = image_size
        self.transform = eval_transform(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i], min_side=self.image_size))


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


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
) -> tuple[np.ndarray, dict]:
    """Features [N,D] for ``paths`` (in order), computing only what ``store`` lacks.

    ``backbone`` is the plain module (the cache key hashes its weights); extraction runs on
    its :func:`inference_backbone` copy.

    Returns the features and stats: hits, misses, seconds, images/s of the extraction.
    """
    start = time.perf_counter()
    digests = [file_digest(p) for p in paths]
    cached = {d: store.get(d) for d in digests} if store is not None else {}
    todo = sorted({d: i for i, d in enumerate(digests) if cached.get(d) is None}.items(),
                  key=lambda kv: kv[1])
    computed: dict[str, np.ndarray] = {}
    extract_s = 0.0
    if todo:
        fused = inference_backbone(backbone)
        loader = DataLoader(
            _ImageFiles([paths[i] for _, i in todo], image_size),
            batch_size=batch_size,
            num_workers=num_workers,
            worker_init_fn=_one_thread if num_workers else None,
        )
        pending_d: list[str] = []
        pending_f: list[np.ndarray] = []
        t0 = time.perf_counter()
        with tqdm(total=len(todo), desc="features", unit="img", mininterval=2) as bar:
            done = 0
            for batch in loader:
                feats = extract_features(fused, batch, precision).numpy()
                batch_digests = [d for d, _ in todo[done : done + len(batch)]]
                done += len(batch)
                computed.update(zip(batch_digests, feats, strict=True))
                pending_d += batch_digests
                pending_f.append(feats)
                if store is not None and len(pending_d) >= flush_every:
                    store.add(pending_d, np.concatenate(pending_f))
                    pending_d, pending_f = [], []
                bar.update(len(batch))
        extract_s = time.perf_counter() - t0
        if store is not None and pending_d:
            store.add(pending_d, np.concatenate(pending_f))
    rows = [cached.get(d) if cached.get(d) is not None else computed[d] for d in digests]
    feats = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    stats = {
        "images": len(paths),
        "cache_hits": len(paths) - len(todo),
        "cache_misses": len(todo),
        "extract_seconds": round(extract_s, 2),
        "extract_images_per_second": round(len(todo) / extract_s, 1) if extract_s else None,
        "seconds": round(time.perf_counter() - start, 2),
    }
    log.info(
        "features: %d images, %d from cache, %d computed%s",
        stats["images"], stats["cache_hits"], stats["cache_misses"],
        f" at {stats['extract_images_per_second']} img/s" if todo else "",
    )
    return feats, stats
