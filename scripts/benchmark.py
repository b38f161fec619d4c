"""Speed figures on this machine (not a test): run after `make run`.

1. feature extraction images/s on the default sample (train + val, 10,000 images), as the
   train stage runs it: the precision `train.precision` resolves to, compiled or not as
   `compute.compile` decides; and the eager path on a subset for comparison;
2. seconds per head epoch on the cached features of the full train split;
3. the machine's GEMM ceiling at the precision in use (square matmuls of 1024-2048, the
   best of 1.5 s of repeats at each size) and extraction as a fraction of it, from the
   backbone's FLOPs per image (torch's FlopCounterMode at data.image_size);
4. against the naive approach: the `train` stage's own command at 10 epochs from an empty
   feature cache (in a scratch copy: its own MLflow store, the workspace untouched) against
   the frozen backbone recomputed every epoch (fp32, eager, batch 64, the reference head)
   timed on --naive-images of the same images; its cost per image is constant, so the naive
   time at 10 epochs is 10 x the sample x that cost (--skip-naive to omit);
5. fast iteration (issue 17's point 6; --skip-exp to omit): three warm head-only
   `dvc exp run -S train.lr=…` in a row after a full run, and their median; then a sweep of
   --sweep values (8) queued with `dvc exp run --queue -S train.lr=…` and run with
   `dvc queue start -j 2`: its total time, how its tasks ended, whether every version it
   registered was decided, and the champion. Every learning rate is new (a random last
   digit), so no run comes back from DVC's run-cache. Like any `dvc exp run`, the three
   runs leave the last experiment applied to the workspace: `git checkout params.yaml &&
   dvc repro` returns to the committed parameters (queued runs leave the workspace alone);
6. where a first `dvc repro` of the default run spends its time, step by step, and the share
   that is not a forward pass (scripts/run_breakdown.py, in a scratch clone from nothing;
   --skip-breakdown to omit).

Extraction's share of the ceiling is given twice: for the whole loop (decoding the JPEGs on
the same cores included) and for the forward passes alone.

    .venv/bin/python scripts/benchmark.py [--images N] [--eager-images 960] [--skip-exp]
                                          [--sweep 8] [--naive-images 320] [--skip-naive]
                                          [--skip-breakdown]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # run_breakdown, scratch

from scratch import pipeline_env, scratch_clone  # noqa: E402

from pipeline import handoffs  # noqa: E402
from pipeline.compute import loader_workers, resolve_compute  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.features.extract import Extraction, compute_features  # noqa: E402
from pipeline.model.devices import cpu_bf16_supported, resolve_precision  # noqa: E402
from pipeline.model.network import HeadSpec, apply_freeze, build_model  # noqa: E402
from pipeline.model.presets import eval_resize_crop, normalize_batch  # noqa: E402
from pipeline.model.weights import build_backbone  # noqa: E402
from pipeline.paths import feature_cache_dir  # noqa: E402
from pipeline.training import LabeledImages, TrainData, TrainJob, train_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAIVE_EPOCHS = 10
HEAD_ONLY_RUNS = 3


def gemm_gflops(precision: str, sizes: tuple[int, ...] = (1024, 1536, 2048),
                seconds: float = 1.5) -> float:
    """The machine's matrix-multiply ceiling at ``precision``: the best GFLOP/s of square
    matmuls of each size, repeated for ``seconds`` each, into a preallocated output (no
    allocation or page faults timed). What a convolution lowers to, at most: a forward pass
    measured above this ceiling would say the ceiling was measured too low (as a 2048² matmul
    best of 10 did once: 838 GFLOP/s against a forward pass at 859; on 2 cores with bf16,
    1024-1536 reached ~1,015 where 2048 gave 947-975 and 4096 816)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        c = torch.empty(n, n, dtype=dtype)
        torch.matmul(a, b, out=c)  # warm-up: thread pool, kernel selection
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=c)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def gflop_per_image(arch: str, image_size: int) -> float:
    """FLOPs of one forward pass of the backbone (torch's own counter, not a table)."""
    from torch.utils.flop_counter import FlopCounterMode

    backbone, _ = build_backbone(arch, "none")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone.eval()(torch.zeros(1, 3, image_size, image_size))
    return counter.get_total_flops() / 1e9


def naive_seconds_per_image(params, root: Path, frame: pd.DataFrame, classes: int,
                            images: int) -> float:
    """The approach the feature cache replaces, as the seed trained: every epoch decodes each
    image and runs the frozen ResNet50 on it again, fp32, eager, batch 64, NCHW, the
    reference head (no feature BatchNorm), Adam. Seconds per image of one pass over
    ``images`` images, after one warm-up batch."""
    size = params.data.image_size
    backbone, _ = build_backbone(params.model.arch, params.model.weights, params.model.init_seed)
    net = build_model(params.model.arch, classes,
                      HeadSpec(params.model.hidden, params.model.dropout, False), backbone)
    apply_freeze(net, "backbone")
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad],
                                 lr=params.train.lr)
    loader = DataLoader(LabeledImages(root, frame.head(images + 64), eval_resize_crop(size),
                                      size), batch_size=64)
    criterion = nn.NLLLoss()
    net.train()
    t0, timed = 0.0, 0
    for i, (pixels, labels) in enumerate(loader):
        if i == 1:
            t0 = time.perf_counter()
        loss = criterion(net(normalize_batch(pixels).contiguous()), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timed += len(labels) if i else 0
    return (time.perf_counter() - t0) / timed


def train_stage_seconds(epochs: int) -> float:
    """Wall time of the `train` stage's command (`stages/python -m stages.train`) at
    ``epochs``, from an empty feature cache, in a scratch copy of HEAD with this workspace's
    data and manifests (hard links) and its own MLflow store: the workspace is untouched."""
    with tempfile.TemporaryDirectory(prefix="food101-bench-") as tmp:
        copy = scratch_clone(Path(tmp) / "repo")
        shutil.copytree(ROOT / "data" / "source", copy / "data" / "source",
                        copy_function=os.link, dirs_exist_ok=True)
        shutil.copytree(ROOT / "data" / "manifests", copy / "data" / "manifests",
                        dirs_exist_ok=True)  # the clone has the folder (.gitignore)
        (copy / "reports").mkdir(exist_ok=True)
        shutil.copy(ROOT / "reports" / "sample.json", copy / "reports" / "sample.json")
        path = copy / "params.yaml"
        params = yaml.safe_load(path.read_text())
        params["train"]["epochs"] = epochs
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        env = pipeline_env(FOOD101_FEATURE_CACHE=str(Path(tmp) / "features"),
                           MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")
        t0 = time.perf_counter()
        subprocess.run(["stages/python", "-m", "stages.train"], cwd=copy, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0


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
        "forward_img_s": (round(len(paths) / stats["forward_seconds"], 1)
                          if stats["forward_seconds"] else None),
        "total_s": round(total, 1),
        "img_s_incl_hashing_and_compile": round(len(paths) / total, 1),
    }


def _new_lrs(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` learning rates around the default, each with a random last digit: values no
    earlier run used, so DVC's run-cache restores none of them."""
    return [f"{0.001 * (k + 1) + 1e-6 * int(rng.integers(1, 1000)):.6f}" for k in range(n)]


def _dvc(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=ROOT, capture_output=True, text=True, env=env)


def head_only_runs(lrs: list[str], env: dict[str, str]) -> dict:
    """Wall seconds of a warm head-only `dvc exp run -S train.lr=…` per value, in a row, and
    whether each promoted its model (then `predict` loads the new champion: ~4 s more)."""
    seconds, promoted, ok = [], [], True
    for lr in lrs:
        t0 = time.perf_counter()
        proc = _dvc("exp", "run", "-S", f"train.lr={lr}", env=env)
        seconds.append(round(time.perf_counter() - t0, 1))
        if proc.returncode:
            ok = False
            print(proc.stderr[-3000:], file=sys.stderr)
        promoted.append(None if proc.returncode else
                        handoffs.Promotion.read(ROOT / handoffs.PROMOTION).promoted)
    return {"head_only_lrs": lrs, "head_only_s": seconds, "head_only_promoted": promoted,
            "head_only_ok": ok, "head_only_median_s": float(np.median(seconds))}


def sweep(lrs: list[str], model_name: str, env: dict[str, str]) -> dict:
    """The values queued (`dvc exp run --queue`), then run by `dvc queue start -j 2`: total
    seconds until the queue has nothing queued or running, each task's end, and the registry
    afterwards (every version the sweep registered decided; which one is champion)."""
    from dvc.repo import Repo  # DVC's own API for the queue's state (`dvc queue status`)

    from pipeline.runs import registry

    def queue_status() -> list[dict]:
        with Repo(str(ROOT)) as repo:
            return repo.experiments.celery_queue.status()

    before = {e["rev"] for e in queue_status()}
    known = {v["version"] for v in registry.list_versions(model_name)}
    for lr in lrs:
        proc = _dvc("exp", "run", "--queue", "-S", f"train.lr={lr}", env=env)
        if proc.returncode:
            raise SystemExit(f"could not queue train.lr={lr}: {proc.stderr[-2000:]}")
    t0 = time.perf_counter()
    proc = _dvc("queue", "start", "-j", "2", env=env)
    if proc.returncode:
        raise SystemExit(f"dvc queue start -j 2 failed: {proc.stderr[-2000:]}")
    deadline = t0 + 60 * 60
    while True:
        mine = [e for e in queue_status() if e["rev"] not in before]
        if mine and all(e["status"] not in ("Queued", "Running") for e in mine):
            break
        if time.perf_counter() > deadline:
            raise SystemExit("the sweep did not finish within an hour: see `dvc queue status`")
        time.sleep(1)
    seconds = time.perf_counter() - t0
    after = registry.list_versions(model_name)
    versions = [v for v in after if v["version"] not in known]
    champions = [v["version"] for v in after if "champion" in v["aliases"]]
    return {
        "sweep_lrs": lrs,
        "sweep_s": round(seconds, 1),
        "sweep_tasks": {s: sum(e["status"] == s for e in mine)
                        for s in sorted({e["status"] for e in mine})},
        "sweep_new_versions": len(versions),
        "sweep_versions_decided": sum(v["promotion"] in ("promoted", "rejected")
                                      for v in versions),
        "sweep_promoted": sorted(v["version"] for v in versions if v["promotion"] == "promoted"),
        "champion_versions": champions,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=0,
                    help="images to extract (default: the whole train+val sample)")
    ap.add_argument("--eager-images", type=int, default=960,
                    help="images for the eager (compute.compile=never) comparison; 0 skips it")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--skip-exp", action="store_true",
                    help="omit the head-only runs and the sweep")
    ap.add_argument("--sweep", type=int, default=8,
                    help="head-only values in the queued sweep (0 omits it)")
    ap.add_argument("--naive-images", type=int, default=320,
                    help="images for the naive recompute-every-epoch timing")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-breakdown", action="store_true")
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
    # As the train stage runs it on the whole sample, compiled (compute.compile: auto compiles
    # where this machine measured that it pays: this run notes the compiled speed and the
    # compile's cost in its record, pipeline/features/compiling.py).
    out["extract"] = extraction(params, paths[: args.images or None], auto,
                                "never" if params.compute.compile == "never" else "always")
    print(json.dumps(out, indent=2), flush=True)
    if args.eager_images:
        out["extract_eager"] = extraction(params, paths[: args.eager_images], auto, "never")
    if auto == "fp32" and cpu_bf16_supported():
        out["extract_bf16"] = extraction(params, paths[: args.eager_images or 960], "bf16",
                                         params.compute.compile)
    ceiling = gemm_gflops(auto)
    flop = gflop_per_image(params.model.arch, params.data.image_size)
    out["gemm_ceiling_gflops"] = round(ceiling, 1)
    out["gflop_per_image"] = round(flop, 3)
    out["ceiling_img_s"] = round(ceiling / flop, 1)
    out["extraction_share_of_ceiling"] = round(out["extract"]["loop_img_s"] * flop / ceiling, 3)
    out["forward_share_of_ceiling"] = round(out["extract"]["forward_img_s"] * flop / ceiling, 3)
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

    if not args.skip_naive:
        per_image = naive_seconds_per_image(params, root, train, len(classes), args.naive_images)
        stage = train_stage_seconds(NAIVE_EPOCHS)
        naive = NAIVE_EPOCHS * len(paths) * per_image
        out["naive_s_per_image_epoch"] = round(per_image, 4)
        out[f"naive_{NAIVE_EPOCHS}_epochs_s"] = round(naive, 1)
        out[f"train_stage_{NAIVE_EPOCHS}_epochs_cold_s"] = round(stage, 1)
        out["speedup_over_naive"] = round(naive / stage, 1)
        print(json.dumps(out, indent=2), flush=True)

    if not args.skip_exp:
        venv_bin = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
        rng = np.random.default_rng()
        out.update(head_only_runs(_new_lrs(HEAD_ONLY_RUNS, rng), env))
        print(json.dumps(out, indent=2), flush=True)
        if args.sweep:
            out.update(sweep(_new_lrs(args.sweep, rng), params.registry.model_name, env))
    print(json.dumps(out, indent=2), flush=True)

    if not args.skip_breakdown:
        from run_breakdown import first_run

        first = first_run()
        out["first_run_dvc_repro_s"] = first["dvc_repro_s"]
        out["first_run_non_forward_share"] = first["non_forward_share"]
        print(json.dumps({k: v for k, v in out.items() if k.startswith("first_run")},
                         indent=2))


if __name__ == "__main__":
    main()
