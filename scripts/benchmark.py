"""Speed figures on this machine (not a test): run after `make run`.

1. feature extraction images/s on the default sample (fp32 NCHW, channels_last, and the
   precision `train.precision: auto` picks here; bf16 too where the CPU supports it);
2. seconds per head epoch on the cached features of the full train split;
3. wall time of `dvc exp run -S train.lr=0.001` after a full run (set --skip-exp to omit).

    .venv/bin/python scripts/benchmark.py [--images 512] [--skip-exp]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_params  # noqa: E402
from pipeline.features import compute_features  # noqa: E402
from pipeline.modeling import bf16_supported, build_backbone, resolve_precision  # noqa: E402
from pipeline.paths import feature_cache_dir  # noqa: E402
from pipeline.sources import load_index  # noqa: E402
from pipeline.training import train_model  # noqa: E402


def extraction(params, root, paths: list[Path], precision: str) -> float:
    """Images/s of the pipeline's own extraction path (decode worker + channels_last)."""
    backbone, _ = build_backbone(params.model.arch, params.model.weights, params.model.init_seed)
    backbone = backbone.to(memory_format=torch.channels_last).eval()
    _, stats = compute_features(
        backbone, paths, store=None, image_size=params.data.image_size, precision=precision,
        batch_size=params.train.feature_batch_size, num_workers=params.train.num_workers,
    )
    return stats["extract_images_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512, help="images per extraction run")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--skip-exp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    params = load_params("params.yaml")
    root, _, _ = load_index(Path("data/source"))
    train = pd.read_csv("data/manifests/train.csv", dtype={"path": str, "label": str})
    val = pd.read_csv("data/manifests/val.csv", dtype={"path": str, "label": str})
    paths = [root / p for p in train["path"].head(args.images)]
    auto = resolve_precision("auto")
    out: dict = {"cpu_threads": torch.get_num_threads(), "bf16_native": bf16_supported(),
                 "auto_precision": auto, "image_size": params.data.image_size,
                 "batch_size": params.train.feature_batch_size}
    out["extract_img_s_fp32_channels_last"] = extraction(params, root, paths, "fp32")
    if auto == "bf16" or bf16_supported():
        out["extract_img_s_bf16_channels_last"] = extraction(params, root, paths, "bf16")
    print(json.dumps(out, indent=2), flush=True)

    # Head epochs on the cached features of the whole train/val split: the `train` stage's
    # own code path (train_model), so the figure is what a head-only experiment pays.
    classes = json.loads(Path("reports/sample.json").read_text())["classes"]
    cfg = dataclasses.replace(params.train, epochs=args.epochs)
    result = train_model(root, train, val, classes, params.model, cfg, params.data.image_size,
                         feature_cache_dir())
    out["load_cached_features_s"] = round(
        sum(s["seconds"] for s in result.feature_stats.values()), 2)
    out["cache_hits"] = sum(s["cache_hits"] for s in result.feature_stats.values())
    out["head_epoch_s"] = round(
        float(np.median([h["epoch_seconds"] for h in result.history])), 3)
    out["head_val_accuracy_after_epochs"] = round(result.final["val_accuracy"], 4)
    print(json.dumps(out, indent=2), flush=True)

    if not args.skip_exp:
        t0 = time.perf_counter()
        venv_bin = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
        proc = subprocess.run(["dvc", "exp", "run", "-S", "train.lr=0.001"],
                              capture_output=True, text=True, env=env)
        out["dvc_exp_run_lr_s"] = round(time.perf_counter() - t0, 1)
        out["dvc_exp_run_ok"] = proc.returncode == 0
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
