"""Commands for people: the registry (list, promote, roll back) and one-off predictions.

    python -m pipeline versions
    python -m pipeline promote 3
    python -m pipeline rollback
    python -m pipeline predict photo1.jpg photo2.png [--model champion|<version>]
    python -m pipeline ui [--port 5000]      # the MLflow UI on the project's store (make ui)
    python -m pipeline ui-links [--port 5000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import webbrowser
from pathlib import Path

from pipeline.config import Params, load_params
from pipeline.errors import USER_ERRORS, PipelineError

UI_WAIT = 90  # seconds for a starting MLflow server to answer /health


def project_params() -> Params:
    """./params.yaml, validated, when there is one; the defaults outside a project (the CLI
    works anywhere). A broken params.yaml is a ConfigError that says what to fix."""
    return load_params() if Path("params.yaml").is_file() else Params()


def _refresh_champion_file(name: str, params: Params) -> None:
    """In the project's DVC workspace, rewrite reports/champion.json after the champion
    moved: ``dvc status`` then shows ``predict`` as changed and ``dvc repro`` re-predicts."""
    from pipeline.handoffs import CHAMPION
    from pipeline.runs import registry

    if not Path("dvc.yaml").is_file() or name != params.registry.model_name:
        return
    ref = registry.resolve(name, params.predict.model)
    ref.champion_file().write()
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
    _refresh_champion_file(args.name, args.params)


def cmd_rollback(args: argparse.Namespace) -> None:
    from pipeline.runs import registry

    out = registry.rollback(args.name)
    print(f"{args.name}: rolled back, champion is now v{out['champion']} "
          f"(previous-champion: {_v(out['previous_champion'])})")
    _refresh_champion_file(args.name, args.params)


def image_files(names: list[str]) -> list[Path]:
    """The files to label: each name as given, a folder as the image files under it (sorted,
    subfolders included: Food-101's ``images/`` labels whole; other files skipped). The
    images are streamed through the model in chunks, so a folder of 25,000 is fine."""
    from pipeline.model.imaging import IMAGE_EXTENSIONS, is_image_file

    missing = [n for n in names if not Path(n).exists()]
    if missing:
        raise PipelineError(f"no such file(s): {', '.join(missing)}")
    files: list[Path] = []
    for name in map(Path, names):
        if not name.is_dir():
            files.append(name)
            continue
        found = sorted(f for f in name.rglob("*") if f.is_file() and is_image_file(f))
        if not found:
            raise PipelineError(f"{name} holds no image files "
                                f"({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
        files += found
    return files


def cmd_predict(args: argparse.Namespace) -> None:
    from pipeline.runs import registry, run_model

    files = image_files(args.files)
    ref = registry.resolve(args.name, args.model)
    preds = run_model.predict_files(ref.uri, files)
    if "error" not in preds:  # a version logged before models reported unreadable rows
        preds["error"] = None
    preds.insert(0, "file", [str(f) for f in files])
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


def ui_links(base_url: str, experiment: str, model_name: str) -> dict[str, str]:
    """The pages to open, in model-training mode: the experiment's runs table (its id looked
    up in the store) and the registered model."""
    from pipeline.runs import notes, tracking

    base = base_url.rstrip("/")
    runs = tracking.runs_page(experiment)
    return {"runs": f"{base}/{runs or notes.ui_route('experiments')}",
            "model": f"{base}/{notes.model_route(model_name)}",
            "found": "yes" if runs else ""}


def _print_links(links: dict[str, str], experiment: str) -> None:
    if not links["found"]:
        print(f"(no experiment {experiment!r} in the store yet: `make run` creates it)")
    print(f"runs:  {links['runs']}")
    print(f"model: {links['model']}", flush=True)


def _desktop() -> bool:
    """A browser can be opened: a graphical session exists (a server has none)."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def cmd_ui_links(args: argparse.Namespace) -> None:
    from pipeline.runs import store

    uri = store.tracking_uri()
    base = uri if uri.startswith(("http://", "https://")) else f"http://{args.host}:{args.port}"
    _print_links(ui_links(base, args.experiment, args.name), args.experiment)


def cmd_ui(args: argparse.Namespace) -> None:
    """Serve the project's store with ``mlflow server`` (one worker, no job runner: it starts
    in seconds), print the links once it answers, open them where a desktop exists."""
    from pipeline.runs import store
    from pipeline.services import wait_for_http

    uri = store.tracking_uri()
    db = store.sqlite_path(uri)
    if db is None:
        print(f"MLFLOW_TRACKING_URI is {uri}: open that server's UI (nothing to start here)")
        cmd_ui_links(args)
        return
    base = f"http://{args.host}:{args.port}"
    with socket.socket() as probe:
        if probe.connect_ex((args.host, args.port)) == 0:
            raise PipelineError(f"something already listens on {args.host}:{args.port} (an "
                                "MLflow UI started before?): stop it, or choose another port "
                                "(make ui PORT=5050, python -m pipeline ui --port 5050)")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", args.host,
         "--port", str(args.port), "--backend-store-uri", uri,
         "--default-artifact-root", str(db.parent / "artifacts")], env=env)
    # `make ui` is stopped with Ctrl-C (SIGINT) or SIGTERM: both end the server too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        wait_for_http(f"{base}/health", server, UI_WAIT, what="the MLflow server")
        links = ui_links(base, args.experiment, args.name)
        print(f"MLflow UI on {uri} (Ctrl-C stops it):")
        _print_links(links, args.experiment)
        if _desktop() and not args.no_browser:
            webbrowser.open(links["runs"])
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        for stop in (None, server.terminate, server.kill):  # Ctrl-C reached the server too
            if server.poll() is not None:
                break
            if stop:
                stop()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def build_parser(params: Params) -> argparse.ArgumentParser:
    """The commands; defaults (model name, experiment) from ``params``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(params=params)
    parser.add_argument("--name", default=params.registry.model_name,
                        help="registered model name (default: registry.model_name)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("versions", help="list versions with aliases and metrics").set_defaults(
        func=cmd_versions)
    p = sub.add_parser("promote", help="make a version the champion")
    p.add_argument("version", type=int)
    p.set_defaults(func=cmd_promote)
    sub.add_parser("rollback", help="give champion back to previous-champion").set_defaults(
        func=cmd_rollback)
    p = sub.add_parser("predict", help="label image files (a folder: every image in it)")
    p.add_argument("files", nargs="+", metavar="file_or_folder")
    p.add_argument("--model", default="champion", help="an alias or a version number")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_predict)
    for command, func, text in (
        ("ui", cmd_ui, "serve the project's MLflow store and print (open) the UI's pages"),
        ("ui-links", cmd_ui_links, "print the UI's pages: runs table, registered model"),
    ):
        p = sub.add_parser(command, help=text)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=5000)
        p.add_argument("--experiment", default=params.mlflow.experiment)
        if command == "ui":
            p.add_argument("--no-browser", action="store_true",
                           help="only print the links (a browser opens where DISPLAY or "
                                "WAYLAND_DISPLAY is set)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        params = project_params()
    except USER_ERRORS as exc:  # a broken params.yaml: its ConfigError says what to fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args = build_parser(params).parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
