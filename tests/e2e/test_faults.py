"""Faults of the whole pipeline, really run on a tiny project (`dvc repro`, `dvc exp run`,
queues): a wrong parameter changes nothing, a promotion outside DVC makes predict stale, a
`kill -9` of train leaves no RUNNING run and the next repro trains again, queued experiments
running two at a time register one version each and promote the best.

All slow: each needs `dvc repro` of a tiny project.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import make_project, poll, project_client, ran_stages, sh


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
    victim = poll(lambda: next((r for r in _runs(repo) if r.info.status == "RUNNING"), None),
                  300, "train opening its MLflow run")
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
    cli_checked = False

    def all_done() -> bool:
        nonlocal cli_checked
        status = sh(repo, "dvc", "queue", "status", env=env).stdout
        if not cli_checked and "Running" in status:  # the CLI works while they run
            sh(repo, "python", "-m", "pipeline", "versions", env=env)
            cli_checked = True
        return "Queued" not in status and "Running" not in status

    poll(all_done, 600, "the three queued experiments finishing", every=1)
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
