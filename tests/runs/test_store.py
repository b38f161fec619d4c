"""The store: where it is (also inside DVC experiment workspaces), what a URI means, and store
calls whose errors are errors (retried when transient, never read as an absence)."""

import json
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
