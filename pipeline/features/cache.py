"""The feature cache: where the backbone features of an image are kept, and when they may be
reused.

With a frozen backbone and no augmentation each image goes through the ResNet50 once, and
epochs and head-only sweeps reuse the stored features.

Key = (arch, sha256 of the backbone's weights and BatchNorm buffers, preprocessing spec,
device type, precision); inside it, one entry per image keyed by the sha256 of the file's
bytes (checked against the manifest: :func:`verified_digests`). A change to any of these can
never reuse stale features (CPU-fp32 features are never mixed with GPU-bf16 ones). Stored as
append-only ``shard-*.npz`` files, written atomically, so concurrent runs (queued DVC
experiments, the ranks of one DDP run) never corrupt it.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.hashing import sha256_bytes, sha256_file
from pipeline.model.inference import INFERENCE_GRAPH
from pipeline.model.presets import Preprocessing


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
            np.savez(fh, digests=np.asarray(digests),
                     features=features.astype(np.float32, copy=False))
        os.replace(tmp, self.dir / f"shard-{uuid.uuid4().hex}.npz")
        rows = self._load()
        for d, f in zip(digests, features, strict=True):
            rows[d] = f
