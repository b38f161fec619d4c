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
import sys
import textwrap
import time
import zlib
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from helpers import (
    REPO,
    free_port,
    log_echo_model,
    make_project,
    project_client,
    ran_stages,
    sh,
    tiny_params,
)
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2
from PIL import Image

from pipeline.model.errors import ImageDecodeError, WeightsError
from pipeline.model.imaging import load_image
from pipeline.runs import registry, tracking
from pipeline.runs.tracking import StoreError

NAME = "faults-model"


# -- store errors are errors ----------------------------------------------------------------


def _fail(code: str, message: str = "the store broke"):
    def fails(*args, **kwargs):
        raise MlflowException(message, error_code=getattr(databricks_pb2, code))

    return fails


@pytest.fixture()
def registered(mlflow_store):
    """v1 (champion, accuracy 0.5) and v2 (challenger, 0.9) of NAME."""
    uri = log_echo_model("faults")
    v1 = registry.register(uri, NAME, {"test_accuracy": "0.500000",
                                       "test_manifest_sha256": "m" * 64})
    registry.gate(NAME, v1, 0.5, "m" * 64, 0.0, lambda u: 0.0)
    v2 = registry.register(uri, NAME, {"test_accuracy": "0.900000",
                                       "test_manifest_sha256": "m" * 64})
    return uri, v1, v2


def _aliases() -> dict:
    return {k: str(v) for k, v in
            tracking.client().get_registered_model(NAME).aliases.items()}


@pytest.mark.parametrize("code", ["INTERNAL_ERROR", "INVALID_PARAMETER_VALUE",
                                  "PERMISSION_DENIED"])
def test_a_failing_registry_read_is_not_read_as_no_champion(registered, code):
    """The old code turned any error into "no champion yet" and promoted."""
    _, _, v2 = registered
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlflow.MlflowClient, "get_registered_model", _fail(code))
        with pytest.raises(StoreError) as err:
            registry.gate(NAME, v2, 0.1, "m" * 64, 0.0, lambda u: 0.0)
        msg = str(err.value)
        assert tracking.tracking_uri() in msg and "read registered model" in msg
        assert code in msg
        with pytest.raises(StoreError):
            registry.resolve(NAME, "champion")
    assert _aliases() == {"champion": "1", "challenger": "2"}  # nothing moved
    assert "promotion" not in registry.get_version(NAME, v2).tags


def test_an_alias_is_unset_only_when_absent_from_the_alias_list(registered, monkeypatch):
    # asking MLflow for an unset alias directly raises INVALID_PARAMETER_VALUE, like other
    # bad requests: the registry reads the alias list instead and never asks
    monkeypatch.setattr(mlflow.MlflowClient, "get_model_version_by_alias",
                        _fail("INVALID_PARAMETER_VALUE"))
    assert registry.alias_version(NAME, "previous-champion") is None
    assert str(registry.alias_version(NAME, "champion").version) == "1"


def test_only_an_existing_model_is_ignored_on_create(registered, monkeypatch):
    uri, _, _ = registered
    versions = len(tracking.client().search_model_versions(f"name='{NAME}'"))
    monkeypatch.setattr(mlflow.MlflowClient, "create_registered_model",
                        _fail("RESOURCE_ALREADY_EXISTS"))
    assert registry.register(uri, NAME, {"test_accuracy": "0.1"}) == str(versions + 1)
    monkeypatch.setattr(mlflow.MlflowClient, "create_registered_model",
                        _fail("INTERNAL_ERROR"))
    with pytest.raises(StoreError, match="create registered model"):
        registry.register(uri, NAME, {"test_accuracy": "0.2"})
    assert len(tracking.client().search_model_versions(f"name='{NAME}'")) == versions + 1


def test_transient_errors_are_retried_then_reported(mlflow_store, monkeypatch):
    calls = []

    def busy_twice():
        calls.append(1)
        if len(calls) <= 2:
            raise MlflowException("database is busy",
                                  error_code=databricks_pb2.TEMPORARILY_UNAVAILABLE)
        return "ok"

    monkeypatch.setattr(time, "sleep", lambda s: None)
    assert tracking.store_call("an operation", busy_twice) == "ok" and len(calls) == 3
    monkeypatch.setattr(tracking, "RETRY_SECONDS", 0.0)
    with pytest.raises(StoreError, match="an operation failed .TEMPORARILY_UNAVAILABLE"):
        tracking.store_call("an operation", _fail("TEMPORARILY_UNAVAILABLE"))


def test_http_retry_defaults_are_bounded_and_a_users_values_win():
    code = ("import os; os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'] = '9'; "
            "from pipeline.runs import tracking; import json; print(json.dumps({k: os.environ[k]"
            " for k in tracking.HTTP_DEFAULTS}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    values = json.loads(out.strip().splitlines()[-1])
    assert values["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"  # the user's
    assert values["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert int(values["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30


def test_an_unreachable_server_stops_train_before_any_work(tiny_data, tmp_path, monkeypatch):
    from pipeline.jobs.train import TrainData, TrainRun, train_and_log

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # quick; the stage test waits
    p = tiny_params()
    data = TrainData(tiny_data.root, tiny_data.classes, tiny_data.train, tiny_data.val)
    with pytest.raises(StoreError) as err:
        train_and_log(TrainRun.from_params(p, data, tmp_path / "features",
                                           spec=tracking.RunSpec("e", "n", {}, {})))
    assert uri in str(err.value) and "reach the store" in str(err.value)
    assert not (tmp_path / "features").exists()  # no feature was extracted


def test_missing_weights_stop_train_before_a_run_is_opened(tiny_data, tmp_path, mlflow_store,
                                                           monkeypatch):
    import torch

    from pipeline.jobs.train import TrainData, TrainRun, train_and_log

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "urlopen", _offline)
    p = tiny_params(model={"weights": "imagenet"})
    data = TrainData(tiny_data.root, tiny_data.classes, tiny_data.train, tiny_data.val)
    with pytest.raises(WeightsError, match="resnet50-11ad3fa6.pth"):
        train_and_log(TrainRun.from_params(p, data, None,
                                           spec=tracking.RunSpec("weights", "n", {}, {})))
    assert mlflow.get_experiment_by_name("weights") is None  # no run, not even an experiment


def _offline(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


# -- killed and stopped processes -------------------------------------------------------------

OWNER = textwrap.dedent("""
    import sys, time
    from pipeline import signals
    from pipeline.runs import tracking
    signals.install()
    spec = tracking.RunSpec("faults", "victim", {}, {})
    try:
        with tracking.start_run(spec) as run_id:
            print(run_id, flush=True)
            time.sleep(120)
    except KeyboardInterrupt as exc:
        sys.exit(signals.exit_code(exc))
""")


def _start_owner(env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    assert run_id, proc.stderr.read()
    return proc, run_id


@pytest.fixture()
def child_env(mlflow_store) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PYTHONPATH": str(REPO)}


def test_a_sigkilled_run_is_reaped_by_the_next_one_and_only_it(child_env):
    proc, run_id = _start_owner(child_env)
    tags = mlflow.get_run(run_id).data.tags
    assert tags[tracking.PID_TAG] == str(proc.pid) and tags[tracking.HOST_TAG]
    exp = tracking.ensure_experiment("faults")
    other = tracking.client().create_run(exp, tags={
        tracking.HOST_TAG: "another-host", tracking.PID_TAG: "1", tracking.STARTED_TAG: "0"})
    assert tracking.reap_killed_runs(exp) == []  # alive, or another machine's: left alone
    proc.kill()
    proc.wait()
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # nobody could end it
    with tracking.start_run(tracking.RunSpec("faults", "next", {}, {})):
        pass
    run = mlflow.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "was gone" in run.data.tags["food101.reaped"]
    assert mlflow.get_run(other.info.run_id).info.status == "RUNNING"


@pytest.mark.parametrize("signum", [signal.SIGTERM,
                                    pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_sigterm_and_ctrl_c_end_the_run_as_killed_at_once(child_env, signum):
    proc, run_id = _start_owner(child_env)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 128 + signum
    assert mlflow.get_run(run_id).info.status == "KILLED"


def test_a_stop_waits_for_the_decision_and_its_record(registered, monkeypatch):
    """SIGTERM in the middle of the gate's writes takes effect after the alias moved and the
    decision was recorded, never between them."""
    from pipeline import signals

    _, v1, v2 = registered
    signals.install()
    real = mlflow.MlflowClient.set_model_version_tag

    def tag_then_stop(self, *args, **kwargs):
        real(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the critical section

    monkeypatch.setattr(mlflow.MlflowClient, "set_model_version_tag", tag_then_stop)
    try:
        with pytest.raises(signals.Terminated):
            registry.gate(NAME, v2, 0.9, "m" * 64, 0.0, lambda u: 0.0)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert _aliases()["champion"] == v2 and _aliases()["previous-champion"] == v1
    assert registry.get_version(NAME, v2).tags["promotion"] == "promoted"


def test_a_reregistered_run_reuses_its_version(registered):
    """An evaluate killed after registering, run again: one version per run and model."""
    uri, _, _ = registered
    run_id = mlflow.search_runs(experiment_names=["faults"], output_format="list")[0].info.run_id
    first = registry.register(uri, NAME, {"run_id": run_id, "test_accuracy": "0.3"})
    again = registry.register(uri, NAME, {"run_id": run_id, "test_accuracy": "0.3"})
    assert first == again
    assert registry.get_version(NAME, first).tags["test_accuracy"] == "0.3"


def test_ties_go_to_the_lower_version_whatever_the_order(registered):
    uri, v1, _ = registered
    tag = {"test_accuracy": "0.700000", "test_manifest_sha256": "m" * 64}
    v3, v4 = registry.register(uri, NAME, tag), registry.register(uri, NAME, tag)
    assert registry.gate(NAME, v4, 0.7, "m" * 64, 0.0, lambda u: 0.0).promoted  # first
    late = registry.gate(NAME, v3, 0.7, "m" * 64, 0.0, lambda u: 0.0)
    assert late.promoted and "lower version wins" in late.reason
    assert _aliases()["champion"] == v3
    assert not registry.gate(NAME, v4, 0.7, "m" * 64, 0.0, lambda u: 0.0).promoted


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


def test_a_concurrent_insert_of_the_same_row_is_retried(mlflow_store, monkeypatch):
    """Two clones logging the same manifest at once on a PostgreSQL server: the loser's
    insert violates the unique key (BAD_REQUEST); run again, it links to the row."""
    calls = []

    def conflict_once():
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException('(psycopg.errors.UniqueViolation) duplicate key value '
                                  'violates unique constraint "dataset_pk"',
                                  error_code=databricks_pb2.BAD_REQUEST)
        return "linked"

    monkeypatch.setattr(time, "sleep", lambda s: None)
    assert tracking.store_call("log dataset train", conflict_once) == "linked"
    with pytest.raises(StoreError, match="BAD_REQUEST"):
        tracking.store_call("log params", _fail("BAD_REQUEST", "a value is too long"))
