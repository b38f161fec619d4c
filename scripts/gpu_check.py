"""The GPU check's Python side (run it through ``scripts/gpu_check.sh``; not part of CI).

Three steps, each a separate process so that each can use its own Python:

- ``library``: the project's own GPU code paths with whatever torch this Python has, on
  generated images, without DVC or MLflow (it fails if either gets imported): feature
  extraction (a batch sweep), the CPU-vs-device feature cosine, head training on cached
  features, a fine-tune epoch (``freeze=layer4``, augmentation), inference as the logged model
  runs it on this machine's device and on the CPU, and, with >= 2 GPUs, DDP over all of them;
- ``pipeline``: with the project's venv, the DVC pipeline in a scratch copy of the project
  (its own MLflow store and feature cache): the default run with ``compute.device=auto``, a
  fine-tune run, and with >= 2 GPUs the same with ``compute.nproc=auto``;
- ``table``: one table of what the other steps wrote.

``--smoke``: tiny data on the CPU, checking the plumbing of this script itself (what
``--cpu-smoke`` runs; DDP then runs with 2 Gloo processes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COLUMNS = [
    ("check", "check"), ("device", "device"), ("precision", "precision"),
    ("extract_ips", "extract img/s"), ("finetune_ips", "fine-tune img/s"),
    ("gpu_mem_mb", "GPU mem peak MB"), ("step_s", "s/step"),
    ("cosine", "cosine vs CPU fp32"), ("accuracy", "accuracy"), ("wall_s", "wall s"),
]


@dataclass
class Row:
    check: str
    device: str = ""
    precision: str = ""
    extract_ips: float | None = None
    finetune_ips: float | None = None
    gpu_mem_mb: float | None = None
    step_s: float | None = None
    cosine: float | None = None
    accuracy: float | None = None
    wall_s: float | None = None


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


# -- library ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    classes: int
    train_per_class: int
    test_per_class: int
    min_side: int
    max_side: int
    image_size: int
    sweep: tuple[int, ...]
    head_epochs: int
    batch_size: int
    cosine_images: int


SMOKE = Sizes(4, 24, 8, 40, 56, 32, (8, 32), 2, 16, 16)
FULL = Sizes(10, 200, 50, 144, 192, 128, (16, 64, 128, 256), 5, 64, 64)


def _data(sizes: Sizes, folder: Path):
    """Generated images in Food-101's layout, sampled and split as the stages do."""
    from pipeline.config import params_from_dict
    from pipeline.data.demo import generate_demo
    from pipeline.data.sampling import draw_sample, split_sample
    from pipeline.data.sources import index_food101

    demo = folder / "food"
    generate_demo(demo, classes=sizes.classes, train_per_class=sizes.train_per_class,
                  test_per_class=sizes.test_per_class, min_side=sizes.min_side,
                  max_side=sizes.max_side, seed=11, workers=max(1, (os.cpu_count() or 1)))
    params = params_from_dict({
        "data": {"image_size": sizes.image_size},
        "sample": {"size": sizes.classes * sizes.train_per_class,
                   "test_size": sizes.classes * sizes.test_per_class, "unlabeled_size": 0},
    })
    root, index, classes = index_food101(demo)
    res = draw_sample(root, index, classes, params.sample, sizes.image_size)
    train, val = split_sample(res.sample.frame, params.split)
    return root, list(classes), train, val, res.test.frame


def _cuda_peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _cuda_peak(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**20)


def _cosines(backbone, paths, image_size: int, device, precision: str) -> dict[str, float]:
    """Minimum cosine similarity, over images, between the device's features (the pipeline's
    extraction path) and the plain eager fp32 backbone on the CPU."""
    import numpy as np
    import torch

    from pipeline.features.extract import Extraction, compute_features
    from pipeline.model.imaging import load_image
    from pipeline.model.presets import eval_pixels, eval_resize_crop, normalize_batch

    geometry = eval_resize_crop(image_size)
    pixels = np.stack([eval_pixels(load_image(p, min_side=image_size), geometry) for p in paths])
    with torch.inference_mode():
        reference = backbone.eval()(normalize_batch(pixels)).float().numpy()
    out = {}
    for prec in dict.fromkeys(["fp32", precision]):
        feats, _ = compute_features(backbone, paths,
                                    Extraction(image_size, prec, device, 16, 0, "never"))
        num = (feats * reference).sum(1)
        den = np.linalg.norm(feats, axis=1) * np.linalg.norm(reference, axis=1)
        out[prec] = float((num / np.maximum(den, 1e-12)).min())
    return out


def ddp_rank(task_file: Path) -> None:
    """One rank of the library DDP check, started by torchrun (``gpu_check.py ddp-rank``):
    joins the group as the train stage does and trains; rank 0 writes the result."""
    from pipeline import distributed
    from pipeline.compute import resolve_compute
    from pipeline.config import params_from_dict
    from pipeline.handoffs import Manifest
    from pipeline.training import TrainData, TrainJob, train_model

    task = json.loads(task_file.read_text())
    p = params_from_dict(task["params"])
    data = TrainData(Path(task["root"]), tuple(task["classes"]), Manifest.read(task["train"]),
                     Manifest.read(task["val"]))
    job = TrainJob.from_params(p, data, None,
                               resolve_compute(p.compute, p.train.precision))
    with distributed.joined(job.compute) as group:
        result = train_model(job, group=group)
        if group is None or group.is_main:
            Path(task["out"]).write_text(json.dumps(
                {"history": result.history, "throughput": result.throughput}))


def library(smoke: bool, out: Path) -> None:
    import torch

    from pipeline import distributed
    from pipeline.compute import resolve_compute
    from pipeline.config import params_from_dict
    from pipeline.features.extract import Extraction, compute_features
    from pipeline.handoffs import Manifest
    from pipeline.model.card import ModelCard
    from pipeline.model.devices import resolve_device, resolve_precision
    from pipeline.model.inference import load_classifier
    from pipeline.model.presets import Preprocessing
    from pipeline.model.weights import build_backbone
    from pipeline.training import TrainData, TrainJob, head_spec, train_model

    sizes = SMOKE if smoke else FULL
    device = torch.device("cpu") if smoke else resolve_device("auto")
    precision = resolve_precision("auto", device)
    dev = str(device)
    log(f"library: torch {torch.__version__} on {dev}, auto precision {precision}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="food101-gpu-check-") as tmp:
        t0 = time.perf_counter()
        root, classes, train, val, test = _data(sizes, Path(tmp))
        log(f"generated {len(train)}+{len(val)}+{len(test)} images in "
            f"{time.perf_counter() - t0:.0f} s")
        paths = [root / p for p in train["path"]]
        backbone, _ = build_backbone("resnet50", "none", 0)

        for batch in sizes.sweep:  # feature extraction, as the train stage runs it
            _cuda_peak_reset(device)
            t0 = time.perf_counter()
            how = Extraction(sizes.image_size, precision, device, batch,
                             0 if smoke else _workers(device), "never")
            _, stats = compute_features(backbone, paths, how)
            rows.append(Row(f"extract, batch {batch}", dev, precision,
                            extract_ips=stats["extract_images_per_second"],
                            gpu_mem_mb=_cuda_peak(device),
                            wall_s=round(time.perf_counter() - t0, 1)))

        cos = _cosines(backbone, paths[: sizes.cosine_images], sizes.image_size, device,
                       precision)
        for prec, value in cos.items():
            rows.append(Row(f"features vs CPU fp32 eager ({prec})", dev, prec,
                            cosine=round(value, 5)))

        data = TrainData(root, tuple(classes), Manifest(train), Manifest(val))

        def params(**sections):
            base = {"epochs": sizes.head_epochs, "batch_size": sizes.batch_size,
                    "log_every": 1000}
            where = {"compile": "never", "device": dev, "feature_batch_size": sizes.sweep[-1]}
            return params_from_dict({"data": {"image_size": sizes.image_size},
                                     "train": {**base, **sections.pop("train", {})},
                                     "compute": {**where, **sections.pop("compute", {})},
                                     **sections})

        def run(name: str, p, finetune: bool) -> tuple:
            job = TrainJob.from_params(p, data, None)
            compute = job.compute
            _cuda_peak_reset(device)
            t0 = time.perf_counter()
            result = train_model(job)
            last = result.history[-1]
            rows.append(Row(name, compute.device, compute.precision,
                            finetune_ips=round(last["train_images_per_second"], 1)
                            if finetune else None,
                            extract_ips=(result.feature_stats.get("train+val", {})
                                         .get("extract_images_per_second")),
                            gpu_mem_mb=_cuda_peak(device),
                            step_s=round(last["seconds_per_step"], 4),
                            accuracy=round(result.final["val_accuracy"], 4),
                            wall_s=round(time.perf_counter() - t0, 1)))
            return result, compute

        head, _ = run("head on cached features (val acc)", params(), False)
        tune, tune_compute = run("fine-tune layer4 + augment, 1 epoch (val acc)",
                                 params(train={"epochs": 1, "augment": True},
                                        model={"freeze": "layer4"}), True)

        # Inference as the logged model runs it: load_classifier resolves the device and
        # the precision on the consumer's machine (here: auto, then the CPU).
        p = params()
        card = ModelCard(arch="resnet50", classes=tuple(classes), image_size=sizes.image_size,
                         head=head_spec(p.model), weights="none", precision=head.precision,
                         preprocessing=Preprocessing.for_size(sizes.image_size), run_id="-")
        state = {k: v.cpu() for k, v in head.model.state_dict().items()}
        sources = [str(root / q) for q in test["path"]]
        truth = test["class_index"].to_numpy()
        for where in ("auto", "cpu"):
            clf = load_classifier(card, state, where)
            _cuda_peak_reset(clf.device)
            t0 = time.perf_counter()
            pred = clf.log_probs(sources, batch_size=64).argmax(1).numpy()
            wall = time.perf_counter() - t0
            rows.append(Row(f"pyfunc inference, device={where} (test acc)", str(clf.device),
                            clf.precision, gpu_mem_mb=_cuda_peak(clf.device),
                            accuracy=round(float((pred == truth).mean()), 4),
                            wall_s=round(wall, 1)))

        gpus = torch.cuda.device_count() if device.type == "cuda" else 0
        if gpus >= 2 or smoke:
            nproc = gpus if gpus >= 2 else 2
            p = params(train={"epochs": 1, "augment": True},
                       compute={"nproc": nproc, "device": "cuda" if gpus >= 2 else "cpu"},
                       model={"freeze": "layer4"})
            compute = resolve_compute(p.compute, p.train.precision)
            Manifest(train).write(Path(tmp) / "train.csv")
            Manifest(val).write(Path(tmp) / "val.csv")
            task = {"params": asdict(p), "root": str(root), "classes": list(classes),
                    "train": str(Path(tmp) / "train.csv"), "val": str(Path(tmp) / "val.csv"),
                    "out": str(Path(tmp) / "ddp.json")}
            (Path(tmp) / "ddp-task.json").write_text(json.dumps(task))
            t0 = time.perf_counter()
            # as the train stage does: the ranks run under torchrun
            distributed.torchrun(compute, [__file__, "ddp-rank", str(Path(tmp) / "ddp-task.json")])
            ddp = json.loads((Path(tmp) / "ddp.json").read_text())
            last = ddp["history"][-1]
            rows.append(Row(f"DDP x{nproc} fine-tune, 1 epoch (val acc)", compute.device,
                            compute.precision,
                            finetune_ips=round(last["train_images_per_second"], 1),
                            gpu_mem_mb=ddp["throughput"].get("gpu_memory_peak_mb"),
                            step_s=round(last["seconds_per_step"], 4),
                            accuracy=round(last["val_accuracy"], 4),
                            wall_s=round(time.perf_counter() - t0, 1)))
        del tune, tune_compute
    leaked = sorted(m for m in ("mlflow", "dvc") if m in sys.modules)
    if leaked:
        raise SystemExit(f"library mode imported {leaked}: it must run without them")
    out.write_text(json.dumps([asdict(r) for r in rows]))


def _workers(device) -> int:
    from pipeline.compute import loader_workers

    return loader_workers("auto", device.type)


# -- pipeline -----------------------------------------------------------------------------------

PROJECT_FILES = ("pipeline", "stages", "dvc.yaml", "params.yaml", "pyproject.toml",
                 ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore")
SMOKE_PARAMS = {
    "data": {"image_size": 32},
    "demo": {"classes": 4, "train_per_class": 20, "test_per_class": 10, "min_side": 40,
             "max_side": 56},
    "sample": {"size": 60, "test_size": 20, "unlabeled_size": 6},
    "train": {"epochs": 2, "batch_size": 16, "log_every": 2},
    "compute": {"compile": "never"},
}


def _project(folder: Path, overrides: dict) -> dict:
    """A scratch copy of the project (git repository, its own store and feature cache)."""
    import yaml

    for name in PROJECT_FILES:
        src, dst = REPO / name, folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    values = yaml.safe_load((folder / "params.yaml").read_text())
    for section, keys in overrides.items():
        values.setdefault(section, {}).update(keys)
    (folder / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "FOOD101_FEATURE_CACHE")}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
               FOOD101_FEATURE_CACHE=str(folder / ".cache" / "features"),
               GIT_AUTHOR_NAME="gpu-check", GIT_AUTHOR_EMAIL="gpu-check@localhost",
               GIT_COMMITTER_NAME="gpu-check", GIT_COMMITTER_EMAIL="gpu-check@localhost",
               MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="true")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "gpu check"]):
        subprocess.run(cmd, cwd=folder, env=env, check=True)
    return env


def _pipeline_row(name: str, folder: Path, wall: float) -> Row:
    import mlflow

    run_id = json.loads((folder / "reports" / "run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder}/mlruns/mlflow.db")
    run = client.get_run(run_id)
    p, m = run.data.params, run.data.metrics
    compute = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/training/compute.json")
    extract = None
    if p.get("resolved.training_path") == "cached-features":
        stats = mlflow.artifacts.load_dict(
            f"{run.info.artifact_uri}/training/feature_cache.json")
        extract = stats["train+val"]["extract_images_per_second"]
    finetune = p.get("resolved.training_path") == "end-to-end"
    return Row(name, p.get("resolved.device", ""), p.get("resolved.precision", ""),
               extract_ips=extract,
               finetune_ips=compute["train_images_per_second"][-1] if finetune else None,
               gpu_mem_mb=compute.get("gpu_memory_peak_mb"),
               step_s=compute["seconds_per_step"][-1], accuracy=m.get("test_accuracy"),
               wall_s=round(wall, 1))


def pipeline(smoke: bool, out: Path) -> None:
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    finetune = ["model.freeze=layer4", "train.augment=true", f"train.epochs={1 if smoke else 3}"]
    runs = [("pipeline default, device=auto (test acc)", [], "repro"),
            ("pipeline fine-tune layer4 + augment (test acc)", finetune, "exp")]
    if gpus >= 2:
        runs += [("pipeline default, nproc=auto (test acc)", ["compute.nproc=auto"], "exp"),
                 ("pipeline fine-tune, nproc=auto (test acc)", [*finetune, "compute.nproc=auto"],
                  "exp")]
    elif smoke:  # the plumbing, with 2 Gloo processes on the CPU
        runs.append(("pipeline default, nproc=2 (test acc)", ["compute.nproc=2"], "exp"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="food101-gpu-check-pipeline-") as tmp:
        folder = Path(tmp) / "project"
        env = _project(folder, SMOKE_PARAMS if smoke else {})
        dvc = [sys.executable, "-m", "dvc"]
        for name, sets, how in runs:
            cmd = dvc + (["repro"] if how == "repro" else
                         ["exp", "run", *[a for s in sets for a in ("-S", s)]])
            log(f"pipeline: {' '.join(cmd[2:])}")
            # each experiment from the committed params, not the last one's
            subprocess.run(["git", "checkout", "-q", "--", "params.yaml"], cwd=folder, env=env,
                           check=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
                raise SystemExit(f"{' '.join(cmd[2:])} failed ({proc.returncode})")
            rows.append(_pipeline_row(name, folder, wall))
    out.write_text(json.dumps([asdict(r) for r in rows]))


# -- table --------------------------------------------------------------------------------------

def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def table(files: list[Path]) -> None:
    rows = [r for f in files if f.exists() for r in json.loads(f.read_text())]
    cells = [[_cell(r[key]) for key, _ in COLUMNS] for r in rows]
    heads = [title for _, title in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(heads)]
    print(" | ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)))
    low = [r["check"] for r in rows
           if r["cosine"] is not None and r["precision"] == "fp32" and r["cosine"] < 0.999]
    if low:
        print(f"LOW: fp32 features differ from the CPU's (cosine < 0.999): {low}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["library", "pipeline", "table", "ddp-rank"])
    ap.add_argument("files", nargs="*", type=Path,
                    help="table: the steps' JSON files; ddp-rank: the task file")
    ap.add_argument("--out", type=Path, help="library/pipeline: where to write the rows")
    ap.add_argument("--smoke", action="store_true", help="tiny data on the CPU")
    args = ap.parse_args()
    if args.step == "table":
        table(args.files)
    elif args.step == "ddp-rank":  # started by torchrun, from the library step
        ddp_rank(args.files[0])
    elif args.step == "library":
        library(args.smoke, args.out)
    else:
        pipeline(args.smoke, args.out)


if __name__ == "__main__":
    main()
