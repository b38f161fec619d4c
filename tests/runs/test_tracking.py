"""MLflow runs in a real store: opened, resumed, logged to and described; ended FINISHED,
FAILED or KILLED (SIGTERM, Ctrl-C), runs of killed processes reaped; and no run opened when
a check before the work fails."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import helpers
import mlflow
import pandas as pd
import pytest
from helpers import REPO, free_port, tiny_params
from mlflow.exceptions import MlflowException

from pipeline.handoffs import Manifest, RunRef
from pipeline.model.errors import WeightsError
from pipeline.runs import notes, spec, store, tracking
from pipeline.runs.spec import Baseline, RunSpec
from pipeline.runs.store import StoreError


def test_start_resume_and_log(mlflow_store, tmp_path):
    manifest_file = tmp_path / "m.csv"
    Manifest(pd.DataFrame({"path": ["a.jpg"], "label": ["x"], "class_index": [0],
                           "sha256": ["0" * 64]})).write(manifest_file)
    manifest = Manifest.read(manifest_file)
    run_spec = RunSpec("tests", "a run", {"stage": "train"}, {"train.lr": 0.1,
                                                               "sample.classes": ("a",),
                                                               "data.root": None})
    with tracking.start_run(run_spec) as run_id:
        tracking.log_manifest(manifest, "train", "training")
        tracking.log_metrics({"val_accuracy": 0.5}, step=1)
        tracking.log_text("a,b\n", "x/table.csv")
    with tracking.resume_run(RunRef(run_id, "a run", "", store.display_uri())):
        tracking.set_tags({"promotion": "promoted"})
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "a run"
    assert run.data.params == {"train.lr": "0.1", "sample.classes": '["a"]',
                               "data.root": "null"}
    assert run.data.tags["promotion"] == "promoted"
    assert run.data.tags["data.train_sha256"] == manifest.sha256
    assert run.inputs.dataset_inputs[0].dataset.name == "train"
    gone = RunRef("0" * 32, "gone", "", store.display_uri())
    with pytest.raises(tracking.TrackingError, match="is gone from it .* `dvc repro -f "
                                                     "--downstream train`"):
        with tracking.resume_run(gone):
            pass


def test_results_made_with_another_store_name_it_and_the_two_ways_out(mlflow_store):
    ref = RunRef("0" * 32, "pulled", "", "http://team-server:5000")
    with pytest.raises(tracking.TrackingError) as err:
        tracking.check_run_here(ref)
    msg = str(err.value)
    assert f"not in the MLflow store {store.display_uri()}" in msg
    assert "made with http://team-server:5000" in msg and "MLFLOW_TRACKING_URI" in msg
    assert "`dvc repro -f --downstream train`" in msg
    with pytest.raises(tracking.TrackingError, match="another store .reports/run.json "
                                                     "predates recording it"):
        tracking.check_run_here(RunRef("0" * 32, "old", ""))  # a run.json from before


def test_a_failing_run_is_marked_failed(mlflow_store):
    with pytest.raises(RuntimeError):
        with tracking.start_run(RunSpec("tests", "boom", {}, {})) as run_id:
            raise RuntimeError("boom")
    assert mlflow.get_run(run_id).info.status == "FAILED"


def test_the_description_uses_the_difference_computed_for_the_name(mlflow_store, monkeypatch):
    run_spec = RunSpec("tests", "lr=0.01", {}, {"train.lr": 0.01}, "m",
                       Baseline("0123456789abcdef", False, (("train.lr", 0.003, 0.01),)))
    monkeypatch.setattr(spec, "_git", lambda *a: pytest.fail("git ran again"))
    with tracking.start_run(run_spec) as run_id:
        tracking.describe_run(run_spec, {"data": "4 images"})
        tracking.set_run_note_section("Evaluation", "first")
        tracking.set_run_note_section("Predict", "p")
        tracking.set_run_note_section("Evaluation", "second")
    note = mlflow.get_run(run_id).data.tags[notes.NOTE]
    assert note.startswith(notes.run_note(run_spec.baseline.changes, "0123456789abcdef", False,
                                          {"data": "4 images"}))
    assert "| `train.lr` | 0.003 | **0.01** |" in note
    assert note.endswith("\n\n### Predict\np\n\n### Evaluation\nsecond")


def test_runs_page_uses_the_stored_view_once_the_experiment_has_it(mlflow_store):
    assert tracking.runs_page("nowhere") is None
    exp_id = tracking.ensure_experiment("ui")
    assert tracking.runs_page("ui") == notes.runs_route(exp_id, view=False)
    tracking.describe_experiment(exp_id, "a-model")
    assert tracking.runs_page("ui") == notes.runs_route(exp_id)
    tags = mlflow.MlflowClient().get_experiment(exp_id).tags
    assert json.loads(tags[notes.VIEW_TAG]) == notes.runs_view_state()
    assert notes.runs_route(exp_id) in tags[notes.NOTE]  # "Compare runs" links the view


# -- killed and stopped processes -------------------------------------------------------------

OWNER = textwrap.dedent("""
    import sys, time
    from pipeline import signals
    from pipeline.runs import tracking
    from pipeline.runs.spec import RunSpec
    signals.install()
    try:
        with tracking.start_run(RunSpec("faults", "victim", {}, {})) as run_id:
            print(run_id, flush=True)
            time.sleep(120)  # until the test stops this process
    except KeyboardInterrupt as exc:
        sys.exit(signals.exit_code(exc))
""")


@pytest.fixture()
def child_env(mlflow_store) -> dict:
    return {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PYTHONPATH": str(REPO)}


def _start_owner(env: dict) -> tuple[subprocess.Popen, str]:
    """A process that owns a running run; returns once the run is open."""
    proc = subprocess.Popen([sys.executable, "-c", OWNER], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    assert run_id, proc.stderr.read()
    return proc, run_id


@pytest.mark.slow  # a fresh interpreter that imports MLflow owns the run
def test_a_sigkilled_run_is_reaped_by_the_next_one_and_only_it(child_env):
    proc, run_id = _start_owner(child_env)
    tags = mlflow.get_run(run_id).data.tags
    assert tags[tracking.PID_TAG] == str(proc.pid) and tags[tracking.HOST_TAG]
    exp = tracking.ensure_experiment("faults")
    other = store.client().create_run(exp, tags={
        tracking.HOST_TAG: "another-host", tracking.PID_TAG: "1", tracking.STARTED_TAG: "0"})
    assert tracking.reap_killed_runs(exp) == []  # alive, or another machine's: left alone
    proc.kill()
    proc.wait()
    assert mlflow.get_run(run_id).info.status == "RUNNING"  # nobody could end it
    with tracking.start_run(RunSpec("faults", "next", {}, {})):
        pass
    run = mlflow.get_run(run_id)
    assert run.info.status == "KILLED"
    assert "was gone" in run.data.tags["food101.reaped"]
    assert mlflow.get_run(other.info.run_id).info.status == "RUNNING"


@pytest.mark.slow  # a fresh interpreter that imports MLflow owns the run
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_end_the_run_as_killed_at_once(child_env, signum):
    proc, run_id = _start_owner(child_env)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 128 + signum
    assert mlflow.get_run(run_id).info.status == "KILLED"


# -- no run when a check before the work fails ------------------------------------------------


def test_an_unreachable_server_stops_train_before_any_work(tiny_data, tmp_path, monkeypatch):
    from pipeline.jobs.train import TrainData, TrainRun, train_and_log

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # quick; the stage test waits
    p = tiny_params()
    data = TrainData(tiny_data.root, tiny_data.classes, tiny_data.train, tiny_data.val)
    with pytest.raises(StoreError) as err:
        train_and_log(TrainRun.from_params(p, data, tmp_path / "features",
                                           spec=RunSpec("e", "n", {}, {})))
    assert uri in str(err.value) and "reach the store" in str(err.value)
    assert not (tmp_path / "features").exists()  # no feature was extracted


def _offline(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


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
                                           spec=RunSpec("weights", "n", {}, {})))
    assert mlflow.get_experiment_by_name("weights") is None  # no run, not even an experiment


def test_training_metrics_are_sent_in_the_background_in_order(mlflow_store, monkeypatch):
    """The loop's log() returns while the store is held up; everything arrives, in order."""
    exp = tracking.ensure_experiment("sender")
    run_id = store.client().create_run(exp).info.run_id
    release = threading.Event()
    real = mlflow.MlflowClient.log_batch

    def held_up(self, *args, **kwargs):
        assert release.wait(60), "the store was never released"
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", held_up)
    with tracking.metric_sender(run_id) as sender:
        for step in range(30):
            sender.log({"train_step_loss": 1.0 / (step + 1)}, step)
        sender.log({"val_accuracy": 0.5, "lr": 0.1}, 0)
        assert not release.is_set()  # 31 log calls returned while the store did not answer
        release.set()
    history = store.client().get_metric_history(run_id, "train_step_loss")
    assert [m.step for m in history] == list(range(30))
    assert [m.value for m in history] == [1.0 / (s + 1) for s in range(30)]
    assert store.client().get_run(run_id).data.metrics["val_accuracy"] == 0.5


def test_a_store_failure_in_the_background_stops_the_loop(mlflow_store, monkeypatch):
    exp = tracking.ensure_experiment("sender")
    run_id = store.client().create_run(exp).info.run_id

    def broken(self, *args, **kwargs):
        raise StoreError("MLflow store x: log metrics failed")

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", broken)
    with pytest.raises(StoreError, match="log metrics failed"):
        with tracking.metric_sender(run_id) as sender:
            sender.log({"train_step_loss": 1.0}, 0)
            helpers.poll(lambda: sender._error is not None, 30, "the sender's failure")
            sender.log({"train_step_loss": 0.5}, 1)  # raised here, in the loop


def test_a_run_is_ended_in_the_store_once_it_answers_again(mlflow_store, monkeypatch):
    """Ending the run rides out an outage too, and really ends it (mlflow.end_run leaves its
    stack before it calls the store, so retrying that call would end nothing)."""
    real, calls = mlflow.MlflowClient.set_terminated, []

    def down_twice(self, *args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise MlflowException("API request failed with exception Max retries exceeded "
                                  "(Caused by NewConnectionError(... Connection refused))")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(store.time, "sleep", lambda s: None)
    with tracking.start_run(RunSpec("tests", "outage", {}, {})) as run_id:
        monkeypatch.setattr(mlflow.MlflowClient, "set_terminated", down_twice)
    assert mlflow.get_run(run_id).info.status == "FINISHED" and len(calls) >= 3
    assert mlflow.active_run() is None
