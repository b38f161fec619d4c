"""The real `dvc repro` / `dvc exp run` of the whole pipeline on tiny params, in a temporary
git repository (its own MLflow store under mlruns/, its own feature cache)."""

import json

import pandas as pd
import pytest
from helpers import make_project, project_client, ran_stages, sh

pytestmark = pytest.mark.slow

STAGES = ("prepare", "sample", "split", "train", "evaluate", "champion", "predict")


def _sh(cwd, *args, env):
    proc = sh(cwd, *args, env=env)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    repo = tmp_path_factory.mktemp("e2e") / "repo"
    env = make_project(repo)
    first = _sh(repo, "dvc", "repro", env=env)
    return repo, env, first


def _client(repo):
    return project_client(repo)


def _champion(repo):
    client = _client(repo)
    return client, client.get_model_version_by_alias("food101-resnet50", "champion")


def test_repro_runs_all_stages_and_ends_with_a_champion(project):
    repo, env, first = project
    assert ran_stages(first) == set(STAGES)
    assert (repo / "mlruns" / "mlflow.db").is_file()
    preds = pd.read_csv(repo / "predictions" / "predictions.csv")
    assert len(preds) == 6
    assert list(preds.columns) == ["file", "label", "confidence", "top5", "error"]
    assert preds["error"].isna().all() and preds["label"].notna().all()
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


def test_second_repro_runs_only_the_champion_lookup(project):
    repo, env, _ = project
    before = (repo / "reports" / "champion.json").read_bytes()
    out = _sh(repo, "dvc", "repro", env=env)
    assert ran_stages(out) == {"champion"}  # always changed: it re-reads the registry
    assert (repo / "reports" / "champion.json").read_bytes() == before
    status = _sh(repo, "dvc", "status", env=env)
    assert "predict" not in status and "train" not in status


def test_head_change_reruns_train_evaluate_predict_only(project):
    repo, env, _ = project
    client = _client(repo)
    v1_acc = float(client.get_model_version("food101-resnet50", "1").tags["test_accuracy"])
    out = _sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.01", env=env)
    assert ran_stages(out) == {"train", "evaluate", "champion", "predict"}
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
    assert ran_stages(out) == {"champion", "predict"}


def test_sample_size_experiment(project):
    """A new draw: the demo writes the photos of that draw (prepare depends on `sample`),
    then sample draws them, every one readable."""
    repo, env, _ = project
    out = _sh(repo, "dvc", "exp", "run", "-S", "sample.size=40", env=env)
    assert "Running stage 'prepare'" in out and "Running stage 'sample'" in out
    report = json.loads((repo / "reports" / "sample.json").read_text())
    assert report["counts"]["sample"] == 40 and report["skipped_count"] == 0
    written = len(list((repo / "data" / "source" / "images").rglob("*.jpg")))
    assert written == sum(report["counts"].values())
    prepared = json.loads((repo / "reports" / "prepare.json").read_text())
    assert prepared["photos_written"] == written
    assert prepared["demo_photos_for_sample"]["size"] == 40


def test_ddp_experiment_is_one_run_with_a_version_and_a_decision(project):
    """`dvc exp run -S compute.nproc=2`: the train stage runs itself as two Gloo ranks under
    torchrun; one MLflow run (rank 0's), a registered version and a champion decision.

    How close its accuracy lands to one process's is tests/test_distributed.py's check (180
    validation images): here 12 images (one image = 0.083) and standard DDP's own batch
    order make the figure a draw, as a new train.seed would."""
    repo, env, _ = project
    client = _client(repo)
    exp_id = client.get_experiment_by_name("food101").experiment_id
    before = {r.info.run_id for r in client.search_runs([exp_id])}
    out = _sh(repo, "dvc", "exp", "run", "-S", "compute.nproc=2", env=env)
    assert ran_stages(out) == {"train", "evaluate", "champion", "predict"}
    new = [r for r in client.search_runs([exp_id]) if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    assert new[0].data.params["resolved.nproc"] == "2"
    decision = json.loads((repo / "reports" / "promotion.json").read_text())
    assert decision["run_id"] == new[0].info.run_id and "promoted" in decision
    version = client.get_model_version("food101-resnet50", decision["version"])
    assert version.run_id == new[0].info.run_id
    two = json.loads((repo / "metrics" / "train.json").read_text())["val_accuracy"]
    assert two == new[0].data.metrics["val_accuracy"]  # rank 0 wrote the stage's outputs
    _sh(repo, "git", "checkout", "params.yaml", env=env)
