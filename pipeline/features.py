"""Feature extraction, in one place: the backbone features of a manifest's images through the
content-keyed cache, the ``torch.compile`` policy, and scoring a manifest with a trained
network (what ``evaluate`` does, without loading the pyfunc or the training code).

With a frozen backbone and no augmentation each image goes through the ResNet50 once, and
epochs and head-only sweeps reuse the stored features.

Key = (arch, sha256 of the backbone's weights and BatchNorm buffers, preprocessing spec,
precision); inside it, one entry per image keyed by the sha256 of the file's bytes. A change
to any of these can never reuse stale features. Stored as append-only ``shard-*.npz`` files,
written atomically, so concurrent runs (queued DVC experiments) never corrupt it.
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

from pipeline.errors import PipelineError
from pipeline.hashing import sha256_bytes, sha256_file
from pipeline.model.card import ModelCard
from pipeline.model.imaging import load_image
from pipeline.model.inference import (
    INFERENCE_GRAPH,
    extract_features,
    inference_backbone,
    resolve_precision,
)
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


def cache_key(arch: str, backbone_digest: str, image_size: int, precision: str) -> str:
    """The folder name for one (arch, weights, preprocessing, precision) combination."""
    blob = json.dumps(
        {
            "arch": arch,
            "backbone": backbone_digest,
            "preprocessing": Preprocessing.for_size(image_size).as_dict(),
            "precision": precision,
            "inference": INFERENCE_GRAPH,
        },
        sort_keys=True,
    )
    return f"{arch}-{image_size}px-{precision}-{sha256_bytes(blob.encode())[:16]}"


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
                      precision: str) -> nn.Module | None:
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
        dummy = normalize_batch(np.zeros((batch_size, image_size, image_size, 3), np.uint8))
        extract_features(model, dummy, precision)
    except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back, keep going
        first_line = (str(exc).splitlines() or [""])[0]
        log.warning("torch.compile failed (%s: %s); extracting without it (set "
                    "train.compile=never to skip trying)", type(exc).__name__, first_line)
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
) -> tuple[np.ndarray, dict]:
    """Features [N,D] for ``paths`` (in order), computing only what ``store`` lacks.

    ``expected_digests``: the sha256 the manifest recorded for each path; an image whose
    bytes differ stops the run (the manifests, and so DVC's view of the data, are stale).
    ``compile``: ``auto`` (when at least :data:`COMPILE_MIN_IMAGES` are missing), ``always``
    or ``never``; see :func:`compiled_backbone`.

    ``backbone`` is the plain module (the cache key hashes its weights); extraction runs on
    its :func:`inference_backbone` copy.

    Returns the features and stats: hits, misses, seconds, images/s of the extraction.
    """
    start = time.perf_counter()
    digests = verified_digests(paths, expected_digests)
    cached = {d: store.get(d) for d in digests} if store is not None else {}
    todo = sorted({d: i for i, d in enumerate(digests) if cached.get(d) is None}.items(),
                  key=lambda kv: kv[1])
    computed: dict[str, np.ndarray] = {}
    extract_s = 0.0
    compiled, compile_s = False, 0.0
    if todo:
        model = fused = inference_backbone(backbone)
        if compile == "always" or (compile == "auto" and len(todo) >= COMPILE_MIN_IMAGES):
            t0 = time.perf_counter()
            faster = compiled_backbone(fused, batch_size, image_size, precision)
            compiled, compile_s = faster is not None, time.perf_counter() - t0
            model = faster if faster is not None else fused
        loader = DataLoader(
            _ImageFiles([paths[i] for _, i in todo], image_size),
            batch_size=batch_size,
            num_workers=num_workers,
            worker_init_fn=_one_thread if num_workers else None,
        )
        pending_d: list[str] = []
        pending_f: list[np.ndarray] = []
        t0 = time.perf_counter()
        with progress(len(todo), "features") as bar:
            done = 0
            for pixels in loader:
                n = len(pixels)
                x = normalize_batch(pixels)
                if compiled and n < batch_size:  # the compiled graph has a static batch size
                    x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
                feats = extract_features(model, x, precision)[:n].numpy()
                batch_digests = [d for d, _ in todo[done : done + n]]
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
    rows = [cached.get(d) if cached.get(d) is not None else computed[d] for d in digests]
    feats = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
    stats = {
        "images": len(paths),
        "cache_hits": len(paths) - len(todo),
        "cache_misses": len(todo),
        "extract_seconds": round(extract_s, 2),
        "extract_images_per_second": round(len(todo) / extract_s, 1) if extract_s else None,
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
) -> tuple[np.ndarray, dict]:
    """[N,D] backbone features of a manifest's images (``root / path``), through the cache in
    ``cache_dir`` (None: no cache); each image is checked against the manifest's sha256."""
    store = None
    if cache_dir is not None:
        store = FeatureStore(
            cache_dir, cache_key(arch, state_digest(backbone), image_size, precision)
        )
    expected = manifest["sha256"].tolist() if "sha256" in manifest else None
    return compute_features(
        backbone, [root / p for p in manifest["path"]], store=store, image_size=image_size,
        precision=precision, batch_size=batch_size, num_workers=num_workers,
        expected_digests=expected, compile=compile,
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
) -> np.ndarray:
    """[N,C] class probabilities of a trained network on a manifest, via the feature cache:
    the logged model's own preprocessing and forward pass (tested against the pyfunc)."""
    feats, _ = manifest_features(
        net.backbone, card.arch, root, manifest, image_size=card.image_size,
        precision=resolve_precision(card.precision), cache_dir=cache_dir,
        batch_size=batch_size, num_workers=num_workers,
    )
    with torch.inference_mode():
        return net.eval().head(torch.from_numpy(feats)).exp().numpy()
