"""The shared stage runner: params checked before any work, user errors as one message."""

import logging

import pytest

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
