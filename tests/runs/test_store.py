"""The store: where it is (also inside DVC experiment workspaces), what a URI means, and store
calls whose errors are errors (retried when transient, never read as an absence)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, free_port
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2

from pipeline.runs import store
from pipeline.runs.store import StoreError


def fail(code: str, message: str = "the store broke"):
    """A store operation that raises MLflow's error ``code``."""
    def fails(*args, **kwargs):
        raise MlflowException(message, error_code=getattr(databricks_pb2, code))

    return fails


def test_default_store_is_absolute_under_the_real_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpxyz"
    ws.mkdir(parents=True)
    monkeypatch.chdir(ws)
    db = (tmp_path / "repo").resolve() / "mlruns" / "mlflow.db"
    assert store.tracking_uri() == f"sqlite:///{db}"
    assert store.sqlite_path() == db and store.is_local_store()
    assert store.artifact_location() == (db.parent / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert store.tracking_uri() == "http://127.0.0.1:5000"
    assert store.sqlite_path() is None and not store.is_local_store()
    assert store.artifact_location() is None  # the server decides


def test_a_sqlite_uri_is_parsed_in_one_place():
    assert store.sqlite_path("sqlite:////abs/mlruns/mlflow.db") == Path("/abs/mlruns/mlflow.db")
    assert store.sqlite_path("postgresql://u@host/mlflow") is None
    assert store.sqlite_path("https://mlflow.example.org") is None


def test_credentials_are_not_shown():
    assert store.display_uri("http://ana:s3cret@host:5005/x") == "http://host:5005/x"
    assert store.display_uri("sqlite:////abs/mlruns/mlflow.db") == (
        "sqlite:////abs/mlruns/mlflow.db")


CONFIGURED: list[str] = []  # what the test above set, for the test below


def test_configure_points_tracking_and_registry_at_the_store(mlflow_store, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:////elsewhere/mlflow.db")
    assert store.configure() == mlflow_store
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == mlflow_store
    CONFIGURED.append(mlflow_store)


def test_what_configure_set_is_not_seen_by_the_next_test():
    """conftest puts MLflow's process-wide URIs back: a client without an explicit registry
    once read the registry another test had configured (a CI failure in test_team)."""
    import mlflow

    assert "MLFLOW_REGISTRY_URI" not in os.environ
    assert mlflow.get_registry_uri() == mlflow.get_tracking_uri()
    assert not set(CONFIGURED) & {mlflow.get_tracking_uri(), mlflow.get_registry_uri()}


@pytest.mark.slow  # runs every schema migration (~5 s)
def test_the_committed_schema_is_what_mlflows_migrations_make(tmp_path):
    """The tests' stores are loaded from fixtures/mlflow_schema.sql (conftest.migrated_db)."""
    import mlflow_schema

    mlflow_schema.migrated(tmp_path / "migrated.db", str(tmp_path / "artifacts"))
    mlflow_schema.load(tmp_path / "loaded.db", tmp_path / "artifacts")
    assert mlflow_schema.schema(tmp_path / "loaded.db") == mlflow_schema.schema(
        tmp_path / "migrated.db"), "out of date: run .venv/bin/python tests/mlflow_schema.py"


@pytest.mark.slow  # runs every schema migration (~5 s); the other tests copy a migrated store
def test_a_missing_sqlite_store_is_created_once(tmp_path, monkeypatch):
    db = tmp_path / "mlruns" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert store.check_store() == f"sqlite:///{db}"
    assert db.is_file() and not list(db.parent.glob(".mlflow.db.creating-*"))


def test_transient_errors_are_retried_then_reported(monkeypatch):
    calls = []

    def busy_twice():
        calls.append(1)
        if len(calls) <= 2:
            raise MlflowException("database is busy",
                                  error_code=databricks_pb2.TEMPORARILY_UNAVAILABLE)
        return "ok"

    monkeypatch.setattr(time, "sleep", lambda s: None)
    assert store.store_call("an operation", busy_twice) == "ok" and len(calls) == 3
    monkeypatch.setattr(store, "RETRY_SECONDS", 0.0)
    with pytest.raises(StoreError, match="an operation failed .TEMPORARILY_UNAVAILABLE"):
        store.store_call("an operation", fail("TEMPORARILY_UNAVAILABLE"))


def test_a_concurrent_insert_of_the_same_row_is_retried(monkeypatch):
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
    assert store.store_call("log dataset train", conflict_once) == "linked"
    with pytest.raises(StoreError, match="BAD_REQUEST"):
        store.store_call("log params", fail("BAD_REQUEST", "a value is too long"))


def test_only_the_allowed_codes_reach_the_caller(monkeypatch):
    uri = "sqlite:////somewhere/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(MlflowException):
        store.store_call("read a model", fail("RESOURCE_DOES_NOT_EXIST"),
                         allow=(store.MISSING,))
    with pytest.raises(StoreError, match=f"{uri}: read a model failed .INTERNAL_ERROR"):
        store.store_call("read a model", fail("INTERNAL_ERROR"), allow=(store.MISSING,))


@pytest.mark.slow  # a fresh interpreter that imports MLflow
def test_http_retry_defaults_are_bounded_and_a_users_values_win():
    code = ("import os; os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'] = '9'; "
            "from pipeline.runs import store; import json; print(json.dumps({k: os.environ[k]"
            " for k in store.HTTP_DEFAULTS}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    values = json.loads(out.strip().splitlines()[-1])
    assert values["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"  # the user's
    assert values["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert int(values["MLFLOW_HTTP_REQUEST_TIMEOUT"]) <= 30


def test_an_unreachable_server_is_an_error_that_names_it(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(StoreError) as err:
        store.check_store()
    assert uri in str(err.value) and "reach the store" in str(err.value)


REFUSED = ("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with "
           "exception HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded "
           "(Caused by NewConnectionError('Failed to establish a new connection: [Errno 111] "
           "Connection refused'))")


class _Clock:
    """time.monotonic and time.sleep for store_call: sleeping moves the clock."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        monkeypatch.setattr(store.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(store.time, "sleep", self.sleep)

    def sleep(self, seconds):
        self.now += seconds


def _down_for(calls: int, message: str = REFUSED):
    """An operation that answers, then fails ``calls`` times with ``message``, then answers."""
    seen = []

    def op():
        seen.append(1)
        if 1 < len(seen) <= 1 + calls:
            raise MlflowException(message)
        return len(seen)

    return op, seen


def test_a_server_that_answered_is_waited_for_through_an_outage(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setattr(store, "_answered", set())
    clock = _Clock(monkeypatch)
    op, seen = _down_for(calls=12)  # 12 refusals, 5 s apart: a one-minute restart
    assert store.store_call("log metrics", op) == 1  # it answered: a known server
    assert store.store_call("log metrics", op) == 14 and len(seen) == 14
    assert 55 <= clock.now < store.OUTAGE_SECONDS


def test_an_outage_past_the_window_names_the_store_and_the_setting(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setenv(store.OUTAGE_ENV, "20")
    monkeypatch.setattr(store, "_answered", set())
    clock = _Clock(monkeypatch)
    op, _ = _down_for(calls=1000)
    store.store_call("log metrics", op)
    with pytest.raises(StoreError) as err:
        store.store_call("log metrics", op)
    assert 20 <= clock.now < 30
    msg = str(err.value)
    assert "http://127.0.0.1:5000: log metrics failed" in msg
    assert "did not answer for 20 s" in msg and store.OUTAGE_ENV in msg


def test_no_waiting_for_a_server_never_reached_or_a_request_that_may_have_applied(
        monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setattr(store, "_answered", set())
    clock = _Clock(monkeypatch)
    refused = fail("INTERNAL_ERROR", REFUSED)
    with pytest.raises(StoreError):  # never answered: a wrong URI, not an outage
        store.store_call("reach the store", refused)
    assert clock.now == 0  # failed at once, no waiting
    op, seen = _down_for(calls=5, message="API request to http://127.0.0.1:5000 failed with "
                                          "timeout exception Read timed out.")
    store.store_call("create a version", op)
    with pytest.raises(StoreError, match="timeout"):  # the server may have applied it
        store.store_call("create a version", op)
    assert len(seen) == 2


@pytest.mark.parametrize("value", ["soon", "-5", "nan"])
def test_a_wrong_outage_window_is_refused_before_any_work(mlflow_store, monkeypatch, value):
    monkeypatch.setenv(store.OUTAGE_ENV, value)
    with pytest.raises(store.TrackingError, match=f"{store.OUTAGE_ENV}=.*number of seconds"):
        store.check_store()
