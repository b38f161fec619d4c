"""The shared stage runner: params checked before any work, user errors as one message."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from pipeline.handoffs import HandoffError
from pipeline.model.errors import WeightsError
from stages.common import run_stage


def test_a_bad_parameter_stops_before_any_work(tmp_path, monkeypatch, caplog):
    (tmp_path / "params.yaml").write_text("split:\n  val_fraction: 2\n")
    monkeypatch.chdir(tmp_path)
    called = []
    with pytest.raises(SystemExit) as exc:
        run_stage(called.append)
    assert exc.value.code == 2
    assert not called  # no work before the check
    assert "split.val_fraction" in caplog.text


@pytest.mark.parametrize("error", [HandoffError("reports/run.json: stale"),
                                   WeightsError("model.weights=x: no such file")])
def test_user_errors_exit_2_with_their_message(tmp_path, monkeypatch, caplog, error):
    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)

    def main(params):
        raise error

    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exc:
        run_stage(main)
    assert exc.value.code == 2
    assert str(error) in caplog.text


def test_other_errors_are_not_hidden(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)

    def main(params):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        run_stage(main)


def test_torch_threads_use_every_core(tmp_path, monkeypatch):
    import gc
    import os

    import torch

    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    seen = []
    run_stage(lambda p: seen.append(torch.get_num_threads()), torch_threads=True)
    gc.unfreeze()  # run_stage froze this test process's objects (stage processes exit)
    assert seen == [max(1, os.cpu_count() or 1)]


def test_with_food101_timings_a_stage_appends_its_seconds(tmp_path, monkeypatch):
    """`make bench`'s breakdown: each stage appends its start-up (process start to its work)
    and run seconds; without the variable nothing is written."""
    import json
    import time

    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FOOD101_TIMINGS", raising=False)
    run_stage(lambda p: None)
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]
    out = tmp_path / "timings.jsonl"
    monkeypatch.setenv("FOOD101_TIMINGS", str(out))
    run_stage(lambda p: time.sleep(0.3))
    run_stage(lambda p: None)
    import gc

    gc.unfreeze()
    first, second = [json.loads(x) for x in out.read_text().splitlines()]
    assert first["run_s"] >= 0.3 > second["run_s"]
    assert first["startup_s"] > 0  # this test process started before run_stage


# -- stages/python: the interpreter of every stage command, found without PATH --------------------

LAUNCHER = REPO / "stages" / "python"


def _which_python(cwd, **env) -> str:
    out = subprocess.run([str(LAUNCHER), "-c", "import sys; print(sys.prefix)"], cwd=cwd,
                         env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_every_stage_runs_with_the_project_interpreter():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert {name: s["cmd"] for name, s in stages.items()} == {
        name: f"stages/python -m stages.{name}" for name in stages}
    assert os.access(LAUNCHER, os.X_OK)
    mode = subprocess.run(["git", "ls-files", "-s", "stages/python"], cwd=REPO,
                          capture_output=True, text=True).stdout.split()
    assert not mode or mode[0] == "100755"  # executable in every clone (once committed)


def test_launcher_finds_the_venv_without_path_also_in_temp_experiments(tmp_path):
    venv = Path(sys.prefix)
    repo = tmp_path / "repo"
    temp_ws = repo / ".dvc" / "tmp" / "exps" / "tmpab12"
    temp_ws.mkdir(parents=True)
    # a shell that never activated the venv: PATH has no venv, yet the stage gets it
    assert _which_python(repo) != str(venv)
    (repo / ".venv").symlink_to(venv)
    assert _which_python(repo) == str(repo / ".venv")
    assert _which_python(temp_ws) == str(repo / ".venv")  # `dvc exp run --temp`
    # an activated venv wins (as `python` on its PATH would)
    assert _which_python(tmp_path, VIRTUAL_ENV=str(venv)) == str(venv)
