"""Helpers shared by the tests (imported as ``helpers``; fixtures live in conftest.py)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking._model_registry import utils as registry_uri_state
from mlflow.tracking._tracking_service import utils as tracking_uri_state
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LEGACY_MODEL = REPO / "tests" / "fixtures" / "legacy_model"
SHARED_MINI = REPO.parent / "shared" / "datasets" / "food101-mini"

TINY_DEMO = dict(classes=4, train_per_class=16, test_per_class=8, min_side=48, max_side=64,
                 seed=7)


def require_shared_photos() -> Path:
    """The shared real Food-101 subset, or a skip that says why and where it should be."""
    if not (SHARED_MINI / "meta" / "train.txt").is_file():
        pytest.skip(f"the shared real Food-101 photos are not at {SHARED_MINI} (CI has them)")
    return SHARED_MINI


def tiny_params(**overrides):
    """Params for tiny, fast runs (32 px images, small samples); ``section=dict`` overrides."""
    from pipeline.config import params_from_dict

    raw = {
        "data": {"image_size": 32},
        "demo": dict(TINY_DEMO),
        "sample": {"size": 48, "test_size": 16, "unlabeled_size": 6, "seed": 1},
        "split": {"val_fraction": 0.25},
        "train": {"epochs": 2, "batch_size": 16, "log_every": 1},
        "compute": {"num_workers": 0, "feature_batch_size": 16},
    }
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return params_from_dict(raw)


def fresh_store(folder: Path, migrated_db: Path) -> str:
    """A new SQLite store in ``folder/mlruns`` (a copy of the migrated template); its URI."""
    (folder / "mlruns").mkdir(parents=True)
    shutil.copyfile(migrated_db, folder / "mlruns" / "mlflow.db")
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


def make_tiny_data(demo_root: Path, folder: Path, **overrides) -> SimpleNamespace:
    """Manifests drawn from a demo folder as the stages do (sample + split), written to
    ``folder`` and read back as the typed hand-offs."""
    from pipeline.data.sampling import draw_sample, split_sample
    from pipeline.data.sources import index_food101
    from pipeline.handoffs import Manifest, UnlabeledKey, write_unlabeled

    params = tiny_params(**overrides)
    root, index, classes = index_food101(demo_root)
    res = draw_sample(root, index, classes, params.sample, params.data.image_size)
    train, val = split_sample(res.sample.frame, params.split)
    paths = {name: folder / f"{name}.csv" for name in ("train", "val", "test", "unlabeled_key")}
    Manifest(train).write(paths["train"])
    Manifest(val).write(paths["val"])
    res.test.write(paths["test"])
    res.unlabeled_key.write(paths["unlabeled_key"])
    write_unlabeled(res.unlabeled_key, root, folder / "unlabeled")
    return SimpleNamespace(
        root=root, classes=res.report.classes, params=params, report=res.report,
        train=Manifest.read(paths["train"]), val=Manifest.read(paths["val"]),
        test=Manifest.read(paths["test"]), key=UnlabeledKey.read(paths["unlabeled_key"]),
        paths=paths, unlabeled=folder / "unlabeled",
    )


# -- bad images: one file of each kind that decoding must refuse or convert -----------------


def bomb_png(width: int = 24_000, height: int = 24_000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def photo(size=(96, 80), colour=(200, 120, 40)) -> Image.Image:
    """A plain RGB picture: one colour, one rectangle of another."""
    img = Image.new("RGB", size, colour)
    img.paste((30, 60, 200), (10, 10, 50, 40))
    return img


def write_zoo(folder: Path, base: Image.Image | None = None) -> dict[str, str]:
    """One file of each kind into ``folder``: name -> "bad" | "odd" (to be converted) |
    "stray" (not an image name)."""
    base = base or photo()
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    base.save(buf, "JPEG", quality=90)
    jpeg = buf.getvalue()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a photo\n")
    (folder / "dangling.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "bomb.png").write_bytes(bomb_png())
    base.convert("CMYK").save(folder / "cmyk.jpg", "JPEG")
    base.convert("P").save(folder / "palette.png", transparency=0)
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257).save(
        folder / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display
    base.save(folder / "rotated.jpg", "JPEG", exif=exif)
    base.save(folder / "png_named.jpg", "PNG")
    base.save(folder / "photo.webp", "WEBP")
    (folder / "notes.txt").write_text("stray file")
    return {"truncated.jpg": "bad", "zero.jpg": "bad", "text.jpg": "bad",
            "dangling.jpg": "bad", "bomb.png": "bad", "cmyk.jpg": "odd",
            "palette.png": "odd", "gray16.png": "odd", "rotated.jpg": "odd",
            "png_named.jpg": "odd", "photo.webp": "odd", "notes.txt": "stray"}


class EchoModel(mlflow.pyfunc.PythonModel):
    """The smallest real pyfunc: returns its input (registry tests need no network)."""

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return model_input


def log_echo_model(experiment: str) -> str:
    """One trivial logged model in the current store; its URI."""
    from pipeline.runs import tracking

    exp = tracking.ensure_experiment(experiment)
    with mlflow.start_run(experiment_id=exp):
        return mlflow.pyfunc.log_model(name="model", python_model=EchoModel(),
                                       pip_requirements=["mlflow"]).model_uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def champion_network(champion, tmp: Path):
    """The (network, card) of the session champion, read from its downloaded model folder."""
    from pipeline.model.pyfunc import load_network
    from pipeline.runs import tracking

    local = tracking.download_model(champion.trained.run.model_uri, tmp / "model-download")
    try:
        return load_network(local)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def log_legacy_model(champion, tmp: Path) -> str:
    """A model as the pipeline's old code logged it (``tests/fixtures/legacy_model``:
    serving.py + imaging.py + modeling.py, meta.json), with the champion's weights; its URI."""
    import torch

    from pipeline.runs import tracking

    net, card = champion_network(champion, tmp)
    torch.save(net.state_dict(), tmp / "weights.pt")
    meta = {"arch": card.arch, "classes": list(card.classes), "image_size": card.image_size,
            "hidden": card.head.hidden, "dropout": card.head.dropout,
            "feature_norm": card.head.feature_norm, "precision": card.precision,
            "batch_size": 16, "weights": card.weights, "run_id": card.run_id}
    (tmp / "meta.json").write_text(json.dumps(meta))
    exp = tracking.ensure_experiment("legacy")
    # MLflow runs the models-from-code file while logging it; the old code found its
    # modules as top-level `imaging` / `modeling` when `pipeline.imaging` did not exist.
    sys.path.insert(0, str(LEGACY_MODEL))
    try:
        with mlflow.start_run(experiment_id=exp):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(LEGACY_MODEL / "serving.py"),
                code_paths=[str(LEGACY_MODEL / "imaging.py"),
                            str(LEGACY_MODEL / "modeling.py")],
                artifacts={"weights": str(tmp / "weights.pt"), "meta": str(tmp / "meta.json")},
                pip_requirements=["mlflow"])
    finally:
        sys.path.remove(str(LEGACY_MODEL))
        for name in ("imaging", "modeling"):
            sys.modules.pop(name, None)
    return info.model_uri


# -- the end-to-end tests: a tiny project, and services started, waited for and stopped -----------

# params.yaml overrides for a whole pipeline in seconds (e2e tests on a temporary repository)
TINY_PROJECT = {
    "data": {"image_size": 32},
    "demo": {"classes": 4, "train_per_class": 20, "test_per_class": 10, "min_side": 40,
             "max_side": 56},
    "sample": {"size": 60, "test_size": 20, "unlabeled_size": 6},
    "train": {"epochs": 2, "batch_size": 16, "log_every": 2},
    "compute": {"num_workers": 0},
}
PROJECT_FILES = ("pipeline", "stages", "dvc.yaml", "pyproject.toml",
                 ".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore")
# What `dvc exp run` rewrites in the workspace (it applies an experiment's `-S` params and
# results there): a copy of the project takes these as committed at HEAD, so the tests start
# from the committed params (plus their own overrides), whatever experiment ran last here.
# dvc.yaml is copied from the working tree like the code: experiments never write it, and it
# must name the modules of the code being tested.
COMMITTED_FILES = ("params.yaml", "dvc.lock")


def committed_text(rel: str, repo: Path = REPO) -> str:
    """The file ``rel`` as committed at HEAD of ``repo`` (not as the workspace has it now)."""
    proc = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=repo, capture_output=True,
                          text=True)
    assert proc.returncode == 0, f"git show HEAD:{rel} in {repo}: {proc.stderr.strip()}"
    return proc.stdout


def sh(cwd: Path, *args: str, env: dict, check: bool = True,
       timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command; with ``check``, fail the test with its output when it fails."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, (
            f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def make_project(repo: Path, params: dict | None = None, source: Path = REPO) -> dict:
    """A git repository at ``repo`` holding the code and pipeline of ``source`` (this
    project) and its committed params.yaml made tiny (``params`` overrides it per section);
    returns the environment to run it in (the venv's tools first, its own MLflow store and
    feature cache)."""
    repo.mkdir(parents=True)
    for name in PROJECT_FILES:
        src, dst = source / name, repo / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    import yaml

    values = yaml.safe_load(committed_text("params.yaml", source))
    for overrides in (TINY_PROJECT, params or {}):
        for section, section_values in overrides.items():
            values.setdefault(section, {}).update(section_values)
    (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    env = {k: v for k, v in os.environ.items()
           if k not in (*URI_VARS, "FOOD101_FEATURE_CACHE")}
    env.update(PATH=f"{BIN}:{env['PATH']}", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", PYTHONPATH=str(repo))
    sh(repo, "git", "init", "-q", "-b", "main", env=env)
    sh(repo, "git", "add", "-A", env=env)
    sh(repo, "git", "commit", "-qm", "tiny", env=env)
    return env


URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def use_store(monkeypatch, uri: str) -> None:
    """Point MLflow's tracking and registry at ``uri`` until ``monkeypatch`` is undone.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` set process-wide state and export
    ``MLFLOW_REGISTRY_URI``, which monkeypatch would not undo: a later test's client without
    an explicit registry URI then reads another test's registry (CI failed so once),
    and subprocesses inherit the variable. Patched here, the old state comes back."""
    for var in URI_VARS:
        monkeypatch.setenv(var, uri)
    monkeypatch.setattr(tracking_uri_state, "_tracking_uri", uri)
    monkeypatch.setattr(registry_uri_state, "_registry_uri", uri)


def project_client(repo: Path) -> mlflow.MlflowClient:
    uri = f"sqlite:///{repo}/mlruns/mlflow.db"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def ran_stages(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    import re

    return set(re.findall(r"Running stage '([^']+)'", output))


def poll(check, seconds: float, what: str, every: float = 0.2):
    """Call ``check()`` until it returns something truthy, and return that; fail the test
    naming ``what`` when ``seconds`` pass first. (Waits for a state, measures nothing.)"""
    deadline = time.monotonic() + seconds
    while True:
        if result := check():
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {seconds} s")
        time.sleep(every)


def wait_for_http(url: str, proc, seconds: float, what: str) -> None:
    """Until ``url`` answers 200 (``pipeline.services.wait_for_http``); fails the test with
    the server's output when ``proc`` exits or time runs out."""
    from pipeline.services import ServiceError
    from pipeline.services import wait_for_http as wait

    try:
        wait(url, proc, seconds, what=what)
    except ServiceError as exc:
        out = proc.stdout.read()[-4000:] if proc.stdout and proc.poll() is not None else ""
        pytest.fail(f"{exc}:\n{out}")


def printed_links(proc, seconds: float) -> dict[str, str]:
    """The ``runs:`` and ``model:`` links that `make ui` / `python -m pipeline ui` print."""
    links, seen, deadline = {}, [], time.monotonic() + seconds
    while "model" not in links and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if m := re.match(r"(runs|model):\s+(\S+)", line):
            links[m.group(1)] = m.group(2)
    assert set(links) == {"runs", "model"}, "no links printed:\n" + "".join(seen[-40:])
    return links


def stop_group(proc, sig: int) -> None:
    """Send ``sig`` to the process group (Ctrl-C is SIGINT to the terminal's group); SIGKILL
    after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    if proc.stdout:
        proc.stdout.close()
