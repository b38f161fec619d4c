"""Where a first `dvc repro` of the default run spends its time (not a test; `make bench`
prints it): the real pipeline in a scratch clone of HEAD, from nothing (no data, an empty DVC
cache, MLflow store and feature cache), step by step.

For every stage: DVC's own part (checking and hashing deps and outputs, the lock file), the
interpreter's start-up and imports, demo generation, `torch.compile`, the network's forward
passes, decoding images for them, and the rest (MLflow logging, model loading, plots, the
predict stage's fresh process). The stages report their start-up and run seconds
(`FOOD101_TIMINGS`, stages/common.py); demo generation, compilation and the forward passes
come from their own log lines; DVC's part is the rest of each stage's wall time.

The figure of issue 17: the share of `dvc repro`'s wall time that is not a forward pass
(<= 25 %; venv creation is not part of it).

    .venv/bin/python scripts/run_breakdown.py [--keep]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scratch import VENV_BIN, pipeline_env, scratch_clone  # noqa: E402

STAGE = re.compile(r"^Running stage '([\w-]+)'")
FORWARD = re.compile(r"computed at [\d.]+ img/s \(forward passes ([\d.]+) s of ([\d.]+) s\)")
COMPILE = re.compile(r"backbone compiled for extraction in ([\d.]+) s")
DEMO = re.compile(r"Demo dataset ready: .* in ([\d.]+) s")
PARTS = ("dvc_s", "startup_s", "demo_s", "compile_s", "forward_s", "decode_s", "other_s")


def timed_lines(cmd: list[str], cwd: Path, env: dict, log) -> tuple[float, list[tuple]]:
    """Run ``cmd``; every output line (tqdm's carriage returns split too) with the seconds
    since the start at which it arrived; the total wall time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for raw in proc.stdout:
        log.write(raw)
        for line in raw.split("\r"):
            if line.strip():
                lines.append((time.perf_counter() - t0, line.strip()))
    proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}) in {cwd}; "
                         f"see {log.name}")
    return wall, lines


def breakdown(wall: float, lines: list[tuple], timings: list[dict]) -> list[dict]:
    """One row per stage (seconds by part), and a first row for DVC before the first stage."""
    starts = [(t, m.group(1)) for t, line in lines if (m := STAGE.match(line))]
    rows = [{"stage": "(dvc start-up)", "wall_s": starts[0][0] if starts else wall}]
    own = {t["stage"]: t for t in timings}
    for k, (t, stage) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else wall
        seen = [line for tt, line in lines if t <= tt < end]
        row = {"stage": stage, "wall_s": end - t, "demo_s": 0.0, "compile_s": 0.0,
               "forward_s": 0.0, "decode_s": 0.0}
        for line in seen:
            if m := FORWARD.search(line):
                row["forward_s"] += float(m.group(1))
                row["decode_s"] += float(m.group(2)) - float(m.group(1))
            if m := COMPILE.search(line):
                row["compile_s"] += float(m.group(1))
            if m := DEMO.search(line):
                row["demo_s"] += float(m.group(1))
        mine = own.get(stage, {})
        row["startup_s"] = mine.get("startup_s") or 0.0
        run = mine.get("run_s", 0.0)
        row["other_s"] = max(run - row["demo_s"] - row["compile_s"] - row["forward_s"]
                             - row["decode_s"], 0.0)
        row["dvc_s"] = max(row["wall_s"] - row["startup_s"] - run, 0.0)
        rows.append(row)
    rows[0]["dvc_s"] = rows[0]["wall_s"]
    return rows


def report(rows: list[dict], wall: float) -> dict:
    """The table as Markdown, the totals by part and the non-forward share."""
    print("| stage | wall s | " + " | ".join(p[:-2] for p in PARTS) + " |")
    print("| --- | --- |" + " --- |" * len(PARTS))
    for r in rows:
        print(f"| {r['stage']} | {r['wall_s']:.1f} | "
              + " | ".join(f"{r.get(p, 0.0):.1f}" for p in PARTS) + " |")
    totals = {p: round(sum(r.get(p, 0.0) for r in rows), 1) for p in PARTS}
    print(f"| **all** | **{wall:.1f}** | " + " | ".join(f"{totals[p]:.1f}" for p in PARTS)
          + " |")
    share = 1 - totals["forward_s"] / wall
    print(f"not a forward pass: {share:.1%} of `dvc repro`'s {wall:.1f} s "
          f"({'ok' if share <= 0.25 else 'MISSED'}, <= 25 %); forward passes "
          f"{totals['forward_s']:.1f} s")
    return {"dvc_repro_s": round(wall, 1), **totals, "non_forward_share": round(share, 3),
            "stages": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()}
                       for r in rows]}


def first_run(keep: bool = False) -> dict:
    """`dvc repro` of the default run in a fresh scratch clone; its breakdown."""
    scratch = Path(tempfile.mkdtemp(prefix="food101-breakdown-"))
    try:
        clone = scratch_clone(scratch / "repo")
        timings = scratch / "timings.jsonl"
        env = pipeline_env(FOOD101_TIMINGS=str(timings))
        with open(scratch / "repro.log", "w") as log:
            wall, lines = timed_lines([str(VENV_BIN / "dvc"), "repro"], clone, env, log)
        rows = breakdown(wall, lines, [json.loads(x) for x in timings.read_text().split("\n")
                                       if x.strip()])
        return report(rows, wall)
    finally:
        if keep:
            print(f"kept {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the scratch clone and its log")
    print(json.dumps(first_run(ap.parse_args().keep), indent=2))
