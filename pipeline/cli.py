"""Commands for people: the registry (list, promote, roll back) and one-off predictions.

    python -m pipeline versions
    python -m pipeline promote 3
    python -m pipeline rollback
    python -m pipeline predict photo1.jpg photo2.png [--model champion|<version>]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from pipeline.errors import USER_ERRORS, PipelineError

DEFAULT_NAME = "food101-resnet50"


def _param(section: str, key: str, default: str) -> str:
    """A value of ./params.yaml when there is one (the CLI also works outside the project)."""
    try:
        raw = yaml.safe_load(Path("params.yaml").read_text()) or {}
        return str(raw.get(section, {}).get(key) or default)
    except (OSError, yaml.YAMLError, AttributeError):
        return default


def _default_name() -> str:
    """registry.model_name from ./params.yaml when there is one."""
    return _param("registry", "model_name", DEFAULT_NAME)


def _refresh_champion_file(name: str) -> None:
    """In the project's DVC workspace, rewrite reports/champion.json after the champion
    moved: ``dvc status`` then shows ``predict`` as changed and ``dvc repro`` re-predicts."""
    from pipeline.handoffs import CHAMPION
    from pipeline.runs import registry

    if not Path("dvc.yaml").is_file() or name != _default_name():
        return
    ref = registry.champion_ref(name, _param("predict", "model", "champion"))
    ref.write()
    print(f"{CHAMPION}: predict.model={ref.ref} is v{ref.version}; `dvc repro` re-runs "
          "predict")


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"


def cmd_versions(args: argparse.Namespace) -> None:
    from pipeline.runs import registry

    rows = registry.list_versions(args.name)
    for r in rows:
        r["aliases"] = ",".join(r["aliases"])
    cols = ["version", "aliases", "test_accuracy", "test_macro_f1", "promotion", "created",
            "run_id"]
    print(_table(rows, cols) if rows else f"{args.name}: no versions yet")


def cmd_promote(args: argparse.Namespace) -> None:
    from pipeline.runs import registry

    out = registry.promote(args.name, args.version)
    if out.get("unchanged"):
        print(f"{args.name}: v{out['champion']} is already the champion")
        return
    print(f"{args.name}: champion is now v{out['champion']} "
          f"(previous-champion: {_v(out['previous_champion'])})")
    _refresh_champion_file(args.name)


def cmd_rollback(args: argparse.Namespace) -> None:
    from pipeline.runs import registry

    out = registry.rollback(args.name)
    print(f"{args.name}: rolled back, champion is now v{out['champion']} "
          f"(previous-champion: {_v(out['previous_champion'])})")
    _refresh_champion_file(args.name)


def cmd_predict(args: argparse.Namespace) -> None:
    from pipeline.runs import registry

    missing = [f for f in args.files if not Path(f).is_file()]
    if missing:
        raise PipelineError(f"no such file(s): {', '.join(missing)}")
    uri, _ = registry.resolve(args.name, args.model)
    preds = registry.predict_files(uri, [Path(f) for f in args.files])
    if "error" not in preds:  # a version logged before models reported unreadable rows
        preds["error"] = None
    preds.insert(0, "file", args.files)
    preds = preds.astype(object).where(preds.notna(), None)
    if args.json:
        print(json.dumps(preds.to_dict(orient="records"), indent=2))
    else:
        rows = preds.to_dict(orient="records")
        for r in rows:
            if r["label"] is not None:
                r["confidence"] = round(r["confidence"], 4)
                r["top5"] = ", ".join(f"{lab} {p:.2f}" for lab, p in json.loads(r["top5"]))
        columns = ["file", "label", "confidence", "top5"]
        print(_table(rows, columns + (["error"] if preds["error"].notna().any() else [])))
    if preds["label"].isna().all():
        raise PipelineError("none of the files is a readable image (jpg, png, webp, ...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=_default_name(),
                        help="registered model name (default: registry.model_name)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("versions", help="list versions with aliases and metrics").set_defaults(
        func=cmd_versions)
    p = sub.add_parser("promote", help="make a version the champion")
    p.add_argument("version", type=int)
    p.set_defaults(func=cmd_promote)
    sub.add_parser("rollback", help="give champion back to previous-champion").set_defaults(
        func=cmd_rollback)
    p = sub.add_parser("predict", help="label image files")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", default="champion", help="an alias or a version number")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
