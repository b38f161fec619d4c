"""Scale benchmark (not a test): the real pipeline, stage by stage, in scratch clones at
about 1,000 images, the default 10,000, and Food-101's full 75,750 + 25,250.

For every stage (`dvc repro --single-item <stage>`, in order, from an empty clone: cold
feature cache, own MLflow store): wall time, images it handled and images/s, the peak RSS of
its largest process, and the disk it added to the DVC cache, the MLflow store and the feature
cache; then the wall time of a no-op `dvc repro`. Writes a CSV and a PNG and prints a
Markdown table and the three figures of issue 17 (time per image at full size within 1.3x of
10,000; peak RSS <= 4 GB; no-op `dvc repro` <= 10 s).

    .venv/bin/python scripts/bench_scale.py [--sizes 1k,10k,full] [--out docs/scale]
    make bench-scale   # the same, all three sizes (14-25 min in all on 2 CPU cores, most
                       # of it the full size: demo generation, DVC hashing, 101,000 forward
                       # passes)

The clones use this repository's committed HEAD and its .venv (VIRTUAL_ENV); they are
deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scratch import ROOT, VENV_BIN, pipeline_env, scratch_clone  # noqa: E402

STAGES = ["prepare", "sample", "split", "train", "evaluate", "champion", "predict"]
SIZES = {  # params.yaml changes per size
    "1k": {"sample": {"size": 1000, "test_size": 250}},
    "10k": {},
    "full": {"demo": {"classes": 101}, "sample": {"size": "all", "test_size": "all"}},
    "smoke": {"demo": {"classes": 2, "train_per_class": 40, "test_per_class": 20},  # the
              "sample": {"size": 60, "test_size": 20, "unlabeled_size": 4}},  # script itself
}
STORES = {"dvc_cache": ".dvc/cache", "mlflow": "mlruns", "features": ".cache/features"}
GB = 1024 ** 3


def du(path: Path) -> int:
    """Bytes under ``path`` (each inode once: DVC links its cache into the workspace)."""
    seen, total = set(), 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except FileNotFoundError:
                continue
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
    return total


def rows(path: Path) -> int:
    with open(path) as fh:
        return max(sum(1 for _ in fh) - 1, 0)


def images(clone: Path, stage: str) -> int:
    """How many images the stage handled (from the files it wrote)."""
    m = clone / "data" / "manifests"
    if stage == "prepare":  # the photos it wrote (the demo writes only what the sample draws)
        report = clone / "reports" / "prepare.json"
        if report.exists():
            return json.loads(report.read_text())["photos_written"]
        return rows(clone / "data" / "source" / "index.csv")
    if stage == "sample":
        return sum(rows(m / f"{n}.csv") for n in ("sample", "test", "unlabeled_key"))
    if stage == "split":
        return rows(m / "sample.csv")
    if stage == "train":
        return rows(m / "train.csv") + rows(m / "val.csv")
    if stage == "evaluate":
        return rows(m / "test.csv")
    if stage == "champion":  # re-scores a champion only when one exists (not in a new store)
        return 0
    return rows(m / "unlabeled_key.csv")


def timed(cmd: list[str], cwd: Path, env: dict, log) -> tuple[float, int]:
    """Wall seconds and the peak RSS (bytes) of the largest process of ``cmd``'s tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}) in {cwd}; "
                         f"see {log.name}")
    return wall, usage.ru_maxrss * 1024  # KB on Linux


def set_params(clone: Path, changes: dict) -> None:
    path = clone / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def bench(size: str, scratch: Path, env: dict) -> list[dict]:
    clone = scratch_clone(scratch / size)
    set_params(clone, SIZES[size])
    dvc = [str(VENV_BIN / "dvc")]
    out = []
    with open(scratch / f"{size}.log", "w") as log:
        for stage in STAGES:
            before = {k: du(clone / v) for k, v in STORES.items()}
            wall, rss = timed([*dvc, "repro", "--single-item", stage], clone, env, log)
            n = images(clone, stage)
            row = {"size": size, "stage": stage, "images": n, "wall_s": round(wall, 1),
                   "images_per_s": round(n / wall, 1) if n else "",
                   "ms_per_image": round(1000 * wall / n, 2) if n else "",
                   "peak_rss_gb": round(rss / GB, 2)}
            row.update({f"{k}_mb_added": round((du(clone / v) - before[k]) / 2**20, 1)
                        for k, v in STORES.items()})
            print(json.dumps(row), flush=True)
            out.append(row)
        wall, rss = timed([*dvc, "repro"], clone, env, log)
        out.append({"size": size, "stage": "no-op repro", "images": 0,
                    "wall_s": round(wall, 1), "peak_rss_gb": round(rss / GB, 2)})
        print(json.dumps(out[-1]), flush=True)
    return out


def verdict(table: list[dict]) -> list[str]:
    by = {(r["size"], r["stage"]): r for r in table}
    lines = []
    if {"10k", "full"} <= {r["size"] for r in table}:
        for stage in STAGES:
            a, b = by[("10k", stage)], by[("full", stage)]
            if a["ms_per_image"] and b["ms_per_image"]:
                ratio = b["ms_per_image"] / a["ms_per_image"]
                lines.append(f"{stage}: time per image full/10k = {ratio:.2f} "
                             f"({'ok' if ratio <= 1.3 else 'MISSED'}, <= 1.3)")
    worst = max(table, key=lambda r: r["peak_rss_gb"])
    lines.append(f"peak RSS: {worst['peak_rss_gb']} GB ({worst['size']} {worst['stage']}; "
                 f"{'ok' if worst['peak_rss_gb'] <= 4 else 'MISSED'}, <= 4 GB)")
    for r in table:
        if r["stage"] == "no-op repro":
            lines.append(f"no-op dvc repro at {r['size']}: {r['wall_s']} s"
                         + (f" ({'ok' if r['wall_s'] <= 10 else 'MISSED'}, <= 10 s)"
                            if r["size"] == "full" else ""))
    return lines


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in table))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, stage in enumerate(STAGES):
        pts = [(s, r) for s in sizes for r in table
               if r["size"] == s and r["stage"] == stage]
        ms = [(s, r["ms_per_image"]) for s, r in pts if r["ms_per_image"] != ""]
        if ms:
            ax1.plot([s for s, _ in ms], [v for _, v in ms], marker="o", color=f"C{k}",
                     label=stage)
        ax2.plot([s for s, _ in pts], [r["peak_rss_gb"] for _, r in pts], marker="o",
                 color=f"C{k}", label=stage)
    ax1.set(title="wall time per image: flat = the cost grows in step with the data", yscale="log",
            xlabel="run size", ylabel="ms / image")
    ax2.axhline(4, color="red", linestyle="--", linewidth=1, label="4 GB")
    ax2.set(title="peak RSS of the stage's largest process", xlabel="run size", ylabel="GB")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1k,10k,full")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "scale")
    ap.add_argument("--keep", action="store_true", help="keep the scratch clones")
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    if unknown := set(sizes) - set(SIZES):
        ap.error(f"unknown size(s) {sorted(unknown)}: choose from {', '.join(SIZES)}")
    env = pipeline_env()
    args.out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="food101-bench-scale-"))
    print(f"scratch clones and logs in {scratch}", file=sys.stderr)
    table = []
    try:
        for size in sizes:
            table += bench(size, scratch, env)
    finally:
        if table:
            fields = list(dict.fromkeys(k for r in table for k in r))
            with open(args.out / "bench_scale.csv", "w", newline="") as fh:
                w = csv.DictWriter(fh, fields, restval="")
                w.writeheader()
                w.writerows(table)
            plot(table, args.out / "bench_scale.png")
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    cols = ["size", "stage", "images", "wall_s", "images_per_s", "peak_rss_gb",
            "dvc_cache_mb_added", "mlflow_mb_added", "features_mb_added"]
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for r in table:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    print("\n".join(verdict(table)))
    print(f"wrote {args.out / 'bench_scale.csv'} and {args.out / 'bench_scale.png'}")


if __name__ == "__main__":
    main()
