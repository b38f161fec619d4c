"""Speed figures on this machine (not a test): run after `make run`.

1. feature extraction images/s on the default sample (train + val, 10,000 images), as the
   train stage runs it: the precision `train.precision` resolves to, compiled or not as
   `compute.compile` decides; and the eager path on a subset for comparison;
2. seconds per head epoch on the cached features of the full train split;
3. wall time of `dvc exp run -S train.lr=0.001` after a full run (set --skip-exp to omit).
   Like any `dvc exp run`, it leaves that experiment applied to the workspace:
   `git checkout params.yaml && dvc repro` returns to the committed parameters.

    .venv/bin/python scripts/benchmark.py [--images N] [--eager-images 960] [--skip-exp]
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

from pipeline import handoffs  # noqa: E402
from pipeline.compute import loader_workers, resolve_compute  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.features.extract import Extraction, compute_features  # noqa: E402
from pipeline.model.devices import cpu_bf16_supported, resolve_precision  # noqa: E402
from pipeline.model.weights import build_backbone  # noqa: E402
from pipeline.paths import feature_cache_dir  # noqa: E402
from pipeline.training import TrainData, TrainJob, train_model  # noqa: E402


def extraction(params, paths: list[Path], precision: str, compile: str) -> dict:
    """The pipeline's own extraction path (decode worker, channels_last, compile policy),
    without the cache: images/s of the loop, and the total including model preparation."""
    backbone, _ = build_backbone(params.model.arch, params.model.weights, params.model.init_seed)
    t0 = time.perf_counter()
    how = Extraction(params.data.image_size, precision, "cpu",
                     params.compute.feature_batch_size,
                     loader_workers(params.compute.num_workers, "cpu"), compile)
    _, stats = compute_features(backbone, paths, how)
    total = time.perf_counter() - t0
    return {
        "images": len(paths),
        "precision": precision,
        "compiled": stats["compiled"],
        "compile_s": stats["compile_seconds"],
        "loop_img_s": stats["extract_images_per_second"],
        "total_s": round(total, 1),
        "img_s_incl_hashing_and_compile": round(len(paths) / total, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=0,
                    help="images to extract (default: the whole train+val sample)")
    ap.add_argument("--eager-images", type=int, default=960,
                    help="images for the eager (compute.compile=never) comparison; 0 skips it")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--skip-exp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    params = load_params("params.yaml")
    report = handoffs.SampleReport.read()
    root, classes = report.image_root(), list(report.classes)
    data = TrainData(root, tuple(classes), handoffs.Manifest.read(handoffs.TRAIN_MANIFEST),
                     handoffs.Manifest.read(handoffs.VAL_MANIFEST))
    train, val = data.train.frame, data.val.frame
    paths = [root / p for p in pd.concat([train, val])["path"]]
    auto = resolve_precision(params.train.precision, "cpu")  # this script measures the CPU
    out: dict = {"cpu_threads": torch.get_num_threads(), "bf16_native": cpu_bf16_supported(),
                 "precision": auto, "image_size": params.data.image_size,
                 "batch_size": params.compute.feature_batch_size,
                 "decode_workers": loader_workers(params.compute.num_workers, "cpu")}
    # As the train stage runs it on the whole sample (compute.compile decides compiling).
    out["extract"] = extraction(params, paths[: args.images or None], auto,
                                params.compute.compile)
    print(json.dumps(out, indent=2), flush=True)
    if args.eager_images:
        out["extract_eager"] = extraction(params, paths[: args.eager_images], auto, "never")
    if auto == "fp32" and cpu_bf16_supported():
        out["extract_bf16"] = extraction(params, paths[: args.eager_images or 960], "bf16",
                                         params.compute.compile)
    print(json.dumps(out, indent=2), flush=True)

    # Head epochs on the cached features of the whole train/val split: the `train` stage's
    # own code path (train_model), so the figure is what a head-only experiment pays.
    params = dataclasses.replace(params, train=dataclasses.replace(params.train,
                                                                   epochs=args.epochs))
    compute = resolve_compute(dataclasses.replace(params.compute, nproc=1),
                              params.train.precision)
    result = train_model(TrainJob.from_params(params, data, feature_cache_dir(), compute))
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
