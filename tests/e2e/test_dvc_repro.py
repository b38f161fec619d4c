"""The real `dvc repro` / `dvc exp run` of the whole pipeline on tiny params, in a temporary
git repository (its own MLflow store under mlruns/, its own feature cache)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from helpers import REPO, TINY_PROJECT

pytestmark = pytest.mark.slow

STAGES = ("prepare", "sample", "split", "train", "evaluate", "predict")
BIN = Path(sys.executable).parent


def _sh(cwd, *args, env):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    repo = tmp_path_factory.mktemp("e2e") / "repo"
    repo.mkdir()
    for name in ("pipeline", "stages", "dvc.yaml", "params.yaml", "pyproject.toml",
                 ".gitignore", ".dvcignore"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, repo / name)
    (repo / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    shutil.copy(REPO / ".dvc" / ".gitignore", repo / ".dvc" / ".gitignore")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in TINY_PROJECT.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "FOOD101_FEATURE_CACHE")}
    env.update(PATH=f"{BIN}:{env['PATH']}", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t", PYTHONPATH=str(repo))
    _sh(repo, "git", "init", "-q", "-b", "main", env=env)
    _sh(repo, "git", "add", "-A", env=env)
    _sh(repo, "git", "commit", "-qm", "tiny", env=env)
    first = _sh(repo, "dvc", "repro", env=env)
    return repo, env, first


def _client(repo):
    uri = f"sqlite:///{repo}/mlruns/mlflow.db"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion(repo):
    client = _client(repo)
    return client, client.get_model_version_by_alias("food101-resnet50", "champion")


def test_repro_runs_all_stages_and_ends_with_a_champion(project):
    repo, env, first = project
    assert _ran(first) == set(STAGES)
    assert (repo / "mlruns" / "mlflow.db").is_file()
    preds = pd.read_csv(repo / "predictions" / "predictions.csv")
    assert len(preds) == 6 and list(preds.columns) == ["file", "label", "confidence", "top5"]
    metrics = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert set(metrics) == {"test_accuracy", "test_top5_accuracy", "test_macro_f1"}
    assert json.loads((repo / "metrics" / "predict.json").read_text())["model_version"] == 1
    decision = json.loads((repo / "reports" / "promotion.json").read_text())
    assert decision["promoted"] and decision["reason"] == "no champion yet"
    _, champ = _champion(repo)
    assert str(champ.version) == "1"
    assert (repo / "plots" / "confusion_matrix.png").stat().st_size > 1000
    report = json.loads((repo / "reports" / "sample.json").read_text())
    assert report["counts"] == {"sample": 60, "test": 20, "unlabeled": 6}
    run_id = json.loads((repo / "reports" / "run.json").read_text())["run_id"]
    run = _client(repo).get_run(run_id)
    assert {"val_accuracy", "test_accuracy", "predict_accuracy"} <= set(run.data.metrics)


def test_second_repro_runs_nothing(project):
    repo, env, _ = project
    out = _sh(repo, "dvc", "repro", env=env)
    assert "Running stage" not in out
    assert "up to date" in _sh(repo, "dvc", "status", env=env)


def _ran(out: str) -> set[str]:
    return {s for s in STAGES if f"Running stage '{s}'" in out}


def test_head_change_reruns_train_evaluate_predict_only(project):
    repo, env, _ = project
    client = _client(repo)
    v1_acc = float(client.get_model_version("food101-resnet50", "1").tags["test_accuracy"])
    out = _sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.01", env=env)
    assert _ran(out) == {"train", "evaluate", "predict"}
    decision = json.loads((repo / "reports" / "promotion.json").read_text())
    assert decision["version"] == "2"
    v2_acc = json.loads((repo / "metrics" / "evaluate.json").read_text())["test_accuracy"]
    # the set-up decides: promoted exactly when v2 beats v1 on the same test manifest
    should = round(v2_acc, 6) > round(v1_acc, 6)
    assert decision["promoted"] is should, (v1_acc, v2_acc, decision["reason"])
    client, champ = _champion(repo)
    v2 = client.get_model_version("food101-resnet50", "2")
    assert v2.tags["promotion"] == ("promoted" if should else "rejected")
    assert str(champ.version) == ("2" if should else "1")
    predicted = json.loads((repo / "metrics" / "predict.json").read_text())["model_version"]
    assert str(predicted) == str(champ.version)  # predict used the champion
    runs = client.search_runs([client.get_experiment_by_name("food101").experiment_id])
    names = {r.info.run_name for r in runs}
    assert any(n.endswith("lr=0.01") for n in names), names
    show = _sh(repo, "dvc", "exp", "show", "--no-pager", "--csv", env=env)
    assert "0.01" in show and "test_accuracy" in show


def test_temp_experiment_writes_to_the_same_store(project):
    repo, env, _ = project
    client = _client(repo)
    exp_id = client.get_experiment_by_name("food101").experiment_id
    before = len(client.search_runs([exp_id]))
    _sh(repo, "dvc", "exp", "run", "--temp", "-S", "train.lr=0.001", env=env)
    runs = client.search_runs([exp_id])
    assert len(runs) == before + 1
    assert any(r.info.run_name.endswith("lr=0.001") and r.data.tags.get("dvc_exp_name")
               for r in runs)
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))  # nothing left behind there


def test_inference_batch_size_reruns_predict_only(project):
    repo, env, _ = project
    out = _sh(repo, "dvc", "exp", "run", "-S", "predict.batch_size=8", env=env)
    assert _ran(out) == {"predict"}


def test_sample_size_experiment(project):
    repo, env, _ = project
    out = _sh(repo, "dvc", "exp", "run", "-S", "sample.size=40", env=env)
    assert "Running stage 'sample'" in out and "Running stage 'prepare'" not in out
    report = json.loads((repo / "reports" / "sample.json").read_text())
    assert report["counts"]["sample"] == 40
