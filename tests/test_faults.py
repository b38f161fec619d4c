"""Fault injection: store errors that are not absences, killed and stopped stages, bad images
and bad parameters, an unreachable server. The registry must never promote the wrong model,
no run may stay RUNNING, nothing already stored is lost.

The scenarios that need a real `dvc repro` of a tiny project are marked slow.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import (
    make_project,
    project_client,
    ran_stages,
    sh,
    tiny_params,
)
from PIL import Image

from pipeline.model.errors import ImageDecodeError
from pipeline.model.imaging import load_image

# -- bad images ------------------------------------------------------------------------------


def bomb_png(width: int = 24_000, height: int = 24_000) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, in a few dozen bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _photo(size=(96, 80), colour=(200, 120, 40)) -> Image.Image:
    img = Image.new("RGB", size, colour)
    img.paste((30, 60, 200), (10, 10, 50, 40))
    return img


def write_zoo(folder: Path, base: Image.Image | None = None) -> dict[str, str]:
    """One file of each kind into ``folder``: name -> "bad" | "odd" (to be converted) |
    "stray" (not an image name)."""
    base = base or _photo()
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


def test_the_image_zoo_decodes_or_is_refused_with_the_reason(tmp_path):
    kinds = write_zoo(tmp_path)
    for name, kind in kinds.items():
        if kind == "bad":
            with pytest.raises(ImageDecodeError) as err:
                load_image(tmp_path / name)
            assert name in str(err.value)
        elif kind == "odd":
            img = load_image(tmp_path / name)
            assert img.mode == "RGB" and min(img.size) >= 80, name
    assert load_image(tmp_path / "rotated.jpg").size == (80, 96)  # EXIF applied
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        load_image(bomb_png(10_000, 9_000))  # between PIL's warning and error limits


def _zoo_folder(root: Path, real: dict[str, list[Image.Image]] | None = None) -> dict:
    """Classes of equal size, the zoo inside the first one: a sample that asks for every
    readable train image must try every file of the train list."""
    kinds = write_zoo(root / "dish_a")
    n_zoo = sum(k != "stray" for k in kinds.values())
    for c, colour in (("dish_a", (200, 60, 60)), ("dish_b", (60, 200, 60)),
                      ("dish_c", (60, 60, 200))):
        (root / c).mkdir(exist_ok=True)
        for i in range(24 - (n_zoo if c == "dish_a" else 0)):
            _photo(colour=tuple(min(255, v + 5 * i) for v in colour)).save(root / c / f"{i}.jpg")
    return {f"dish_a/{n}": k for n, k in kinds.items()}


def test_sample_skips_the_bad_files_and_uses_the_odd_ones(tmp_path):
    from pipeline.data.sampling import draw_sample
    from pipeline.data.sources import index_imagefolder

    kinds = _zoo_folder(tmp_path)
    root, index, classes, ignored = index_imagefolder(tmp_path, 0.25, seed=0)
    assert ignored == 1  # notes.txt
    assert set(index["path"]) == {p for p, k in kinds.items() if k != "stray"} | set(
        index.loc[~index["path"].str.startswith("dish_a/") | ~index["path"].isin(kinds), "path"])
    train = set(index.loc[index["split"] == "train", "path"])
    bad = {p for p, k in kinds.items() if k == "bad"}
    odd = {p for p, k in kinds.items() if k == "odd"}
    size = len(train - bad)  # every readable train image
    params = tiny_params(sample={"size": size, "test_size": 6, "unlabeled_size": 2})
    res = draw_sample(root, index, classes, params.sample, 32)
    used = set(res.sample.frame["path"]) | set(res.test.frame["path"]) | set(
        res.unlabeled_key.frame["source_path"])
    skipped = {s.path: s.reason for s in res.report.skipped}
    assert not used & bad  # no bad file in any manifest
    assert train & bad <= set(skipped) <= bad  # every bad one it touched, with the reason
    assert all(skipped.values()) and res.report.skipped_count == len(skipped)
    assert train & odd <= set(res.sample.frame["path"])  # the odd formats are used


@pytest.mark.slow
def test_the_cli_labels_the_readable_files_and_reports_the_others(champion_store, tmp_path,
                                                                  capsys):
    from pipeline.cli import main

    c = champion_store
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    good = str(c.data.root / c.data.test.frame["path"].iloc[0])
    capsys.readouterr()
    assert main(["--name", c.name, "predict", "--json", str(tmp_path / "bomb.png"), good]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["label"] is None and "decompression bomb" in rows[0]["error"]
    assert rows[1]["label"] == c.evaluated.confusion["predicted"].iloc[0]


# -- the pipeline, really run (slow) ---------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project after `dvc repro` (champion v1), shared by the slow scenarios."""
    repo = tmp_path_factory.mktemp("faults") / "repo"
    env = make_project(repo)
    sh(repo, "dvc", "repro", env=env)
    return repo, env


def _runs(repo: Path) -> list:
    c = project_client(repo)
    exp = c.get_experiment_by_name("food101")
    return c.search_runs([exp.experiment_id], max_results=1000)


@pytest.mark.slow
@pytest.mark.parametrize(("override", "key"), [
    ("train.lr=-1", "train.lr"),
    ("model.freeze=everything", "model.freeze"),
    ("sample.size=999999", "sample.size"),
    ("train.epochs=0", "train.epochs"),
    ("data.image_size=abc", "data.image_size"),
])
def test_a_wrong_parameter_stops_dvc_exp_run_and_changes_nothing(project, override, key):
    repo, env = project
    lock = (repo / "dvc.lock").read_bytes()
    runs, versions = len(_runs(repo)), len(project_client(repo).search_model_versions())
    proc = sh(repo, "dvc", "exp", "run", "-S", override, env=env, check=False)
    sh(repo, "git", "checkout", "--", "params.yaml", env=env)  # dvc leaves -S applied
    assert proc.returncode != 0
    assert key in proc.stdout + proc.stderr
    assert (repo / "dvc.lock").read_bytes() == lock
    assert len(_runs(repo)) == runs
    assert len(project_client(repo).search_model_versions()) == versions


@pytest.mark.slow
def test_promote_elsewhere_makes_predict_stale_and_repro_reruns_it(project):
    repo, env = project
    sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.02", env=env)  # a second version
    champion = json.loads((repo / "reports" / "champion.json").read_text())["version"]
    other = "1" if champion == "2" else "2"
    out = sh(repo, "python", "-m", "pipeline", "promote", other, env=env).stdout
    assert "reports/champion.json" in out
    status = sh(repo, "dvc", "status", env=env).stdout
    assert "predict" in status
    out = sh(repo, "dvc", "repro", env=env)
    assert _predicted_again(out) and ran_stages(out.stdout + out.stderr) <= {"champion",
                                                                               "predict"}
    assert json.loads((repo / "metrics" / "predict.json").read_text())["model_version"] == int(
        other)
    sh(repo, "python", "-m", "pipeline", "rollback", env=env)
    out = sh(repo, "dvc", "repro", env=env)
    assert _predicted_again(out) and ran_stages(out.stdout + out.stderr) <= {"champion",
                                                                               "predict"}
    assert json.loads((repo / "metrics" / "predict.json").read_text())["model_version"] == int(
        champion)


def _predicted_again(out) -> bool:
    """predict ran, or DVC restored it from its run-cache: the predictions this champion made
    before (the same model, images and code: the same predictions)."""
    text = out.stdout + out.stderr
    return "predict" in ran_stages(text) or "Stage 'predict' is cached" in text


@pytest.mark.slow
def test_kill_9_of_train_then_repro(project):
    repo, env = project
    sh(repo, "git", "checkout", "--", "params.yaml", env=env)
    sh(repo, "dvc", "repro", env=env)
    versions = {v.version for v in project_client(repo).search_model_versions()}
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(params.replace("lr: 0.003", "lr: 0.004"))
    proc = subprocess.Popen(["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    victim = None
    while time.monotonic() < deadline and victim is None:
        running = [r for r in _runs(repo) if r.info.status == "RUNNING"]
        if running:
            victim = running[0]
        time.sleep(0.2)
    assert victim is not None, "train never opened its run"
    os.killpg(proc.pid, signal.SIGKILL)  # dvc, the stage, everything: as the OOM killer would
    proc.wait()
    out = sh(repo, "dvc", "repro", env=env)
    assert "train" in ran_stages(out.stdout + out.stderr)
    statuses = {r.info.run_id: r.info.status for r in _runs(repo)}
    assert "RUNNING" not in statuses.values()
    assert statuses[victim.info.run_id] == "KILLED"
    new = [v for v in project_client(repo).search_model_versions() if v.version not in versions]
    assert len(new) == 1 and new[0].run_id != victim.info.run_id
    (repo / "params.yaml").write_text(params)


@pytest.mark.slow
def test_three_queued_experiments_two_at_a_time(project):
    repo, env = project
    sh(repo, "git", "checkout", "--", "params.yaml", env=env)
    before = {str(v.version) for v in project_client(repo).search_model_versions()}
    runs_before = {r.info.run_id for r in _runs(repo)}
    for lr in ("0.0011", "0.0012", "0.0013"):
        sh(repo, "dvc", "exp", "run", "--queue", "-S", f"train.lr={lr}", env=env)
    sh(repo, "dvc", "queue", "start", "-j", "2", env=env)
    deadline = time.monotonic() + 600
    cli_checked = False
    while time.monotonic() < deadline:
        status = sh(repo, "dvc", "queue", "status", env=env).stdout
        if not cli_checked and "Running" in status:  # the CLI works while they run
            sh(repo, "python", "-m", "pipeline", "versions", env=env)
            cli_checked = True
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    status = sh(repo, "dvc", "queue", "status", env=env).stdout
    assert status.count("Success") >= 3, status
    logs = ""
    for line in status.splitlines()[1:]:
        task = line.split()[0] if line.strip() else ""
        if task and task != "Worker":
            logs += sh(repo, "dvc", "queue", "logs", task, env=env, check=False).stdout
    assert logs.count("Running stage 'train'") == 3  # the logs of all three were read
    assert "database is locked" not in logs
    client = project_client(repo)
    new_runs = [r for r in _runs(repo) if r.info.run_id not in runs_before]
    assert len(new_runs) == 3 and all(r.info.status == "FINISHED" for r in new_runs)
    versions = client.search_model_versions("name='food101-resnet50'")
    new = [v for v in versions if str(v.version) not in before]
    assert len(new) == 3
    model = client.get_registered_model("food101-resnet50")
    champion = str(model.aliases["champion"])
    acc = {str(v.version): float(v.tags["test_accuracy"]) for v in versions}
    best = max(acc.values())
    assert acc[champion] == best
    assert champion == str(min(int(v) for v, a in acc.items() if a == best))  # ties: lower


@pytest.mark.slow
def test_real_photos_with_one_bad_file_of_each_kind(tmp_path):
    """An ImageFolder of real Food-101 photos plus the zoo: `dvc repro` succeeds, no bad file
    in any manifest, each one the sample touched is listed with its reason, the odd formats
    are used."""
    from helpers import require_shared_photos

    from pipeline.data.sources import index_imagefolder

    mini = require_shared_photos()
    folder = tmp_path / "photos"
    classes = sorted(p.name for p in (mini / "images").iterdir())[:3]
    base = Image.open(next((mini / "images" / classes[0]).glob("*.jpg"))).convert("RGB")
    kinds = {f"{classes[0]}/{n}": k for n, k in write_zoo(folder / classes[0], base).items()}
    n_zoo = sum(k != "stray" for k in kinds.values())
    for c in classes:
        (folder / c).mkdir(exist_ok=True)
        photos = sorted((mini / "images" / c).glob("*.jpg"))
        for src in photos[: 30 - (n_zoo if c == classes[0] else 0)]:
            (folder / c / src.name).symlink_to(src)
    _, index, _, _ = index_imagefolder(folder, 0.3, seed=0)
    train = set(index.loc[index["split"] == "train", "path"])
    bad = {p for p, k in kinds.items() if k == "bad"}
    odd = {p for p, k in kinds.items() if k == "odd"}
    repo = tmp_path / "repo"
    env = make_project(repo, {
        "data": {"source": "imagefolder", "root": str(folder), "image_size": 32,
                 "test_fraction": 0.3, "seed": 0},
        "sample": {"size": len(train - bad), "test_size": 12, "unlabeled_size": 4},
    })
    sh(repo, "dvc", "repro", env=env)
    report = json.loads((repo / "reports" / "sample.json").read_text())
    source = json.loads((repo / "data" / "source" / "source.json").read_text())
    assert source["ignored_files"] == 1
    sample = pd.read_csv(repo / "data" / "manifests" / "sample.csv")
    test = pd.read_csv(repo / "data" / "manifests" / "test.csv")
    key = pd.read_csv(repo / "data" / "manifests" / "unlabeled_key.csv")
    used = set(sample["path"]) | set(test["path"]) | set(key["source_path"])
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert not used & bad
    assert train & bad <= set(skipped) <= bad and all(skipped.values())
    assert train & odd <= set(sample["path"])
    assert (repo / "predictions" / "predictions.csv").is_file()
