"""Fault injection: store errors that are not absences, killed and stopped stages, bad images
and bad parameters, an unreachable server. The registry must never promote the wrong model,
no run may stay RUNNING, nothing already stored is lost.

The scenarios that need a real `dvc repro` of a tiny project are marked slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest
from helpers import (
    REPO,
    free_port,
    log_echo_model,
    tiny_params,
)
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from pipeline.model.errors import WeightsError
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
    from pipeline.jobs.train import TrainData, train_and_log

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # quick; the stage test waits
    p = tiny_params()
    data = TrainData(tiny_data.root, tiny_data.classes, tiny_data.train, tiny_data.val)
    with pytest.raises(StoreError) as err:
        train_and_log(data, p.model, p.train, 32, tracking.RunSpec("e", "n", {}, {}),
                      tmp_path / "features", p.compute)
    assert uri in str(err.value) and "reach the store" in str(err.value)
    assert not (tmp_path / "features").exists()  # no feature was extracted


def test_missing_weights_stop_train_before_a_run_is_opened(tiny_data, tmp_path, mlflow_store,
                                                           monkeypatch):
    import torch

    from pipeline.jobs.train import TrainData, train_and_log

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "urlopen", _offline)
    p = tiny_params(model={"weights": "imagenet"})
    data = TrainData(tiny_data.root, tiny_data.classes, tiny_data.train, tiny_data.val)
    with pytest.raises(WeightsError, match="resnet50-11ad3fa6.pth"):
        train_and_log(data, p.model, p.train, 32, tracking.RunSpec("weights", "n", {}, {}),
                      None, p.compute)
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
