"""The MLflow store: where it is, creating it, and calling it (errors vs absences, retries).

The store is SQLite under the project's own ``mlruns/`` at an absolute path, also inside
``dvc exp run --temp``; ``MLFLOW_TRACKING_URI`` overrides it (a team server). Tracking and
registry share it.

Errors are errors: every store call goes through :func:`store_call`, which retries transient
failures (a busy SQLite database) for a bounded time and turns any other store failure into
a :class:`StoreError` naming the store and the operation. Only the codes a caller asks for
(:data:`MISSING`, :data:`EXISTS`) reach it as MLflow's own exception. HTTP stores retry in
MLflow itself (``MLFLOW_HTTP_REQUEST_*``, given bounded defaults here; a user's values win);
once a server has answered, a server that stops answering (a restart of the team server) is
waited for up to :func:`outage_seconds` before it is an error.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # logs, not a terminal
# MLflow's own HTTP retries (team server): its defaults (7 retries, backoff factor 2) wait
# ~4 minutes for a server that is not there. Bounded: ~15 s for a refused connection.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
for _key, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

# MLflow hints that do not apply here: the manifests' class_index never has missing values,
# and the dataset source is a local CSV either way.
for _msg in (
    r".*Inferred schema contains integer column.*",
    r".*dataset source can be interpreted in multiple ways.*",
):
    warnings.filterwarnings("ignore", message=_msg)

import mlflow  # noqa: E402  (after the environment defaults above, which MLflow reads)
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.paths import project_root  # noqa: E402

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"  # the local store's scheme: sqlite:////abs/path/mlflow.db


class TrackingError(PipelineError):
    """The MLflow store or run is not where the pipeline expects it."""


class StoreError(TrackingError):
    """The MLflow store failed an operation (unreachable, refused, broken)."""


T = TypeVar("T")
MISSING = "RESOURCE_DOES_NOT_EXIST"
EXISTS = "RESOURCE_ALREADY_EXISTS"
TRANSIENT = ("TEMPORARILY_UNAVAILABLE",)  # what MLflow's SQL store makes of a busy database
# Two pipelines inserting the same row at once (the same manifest logged as a dataset by two
# clones): the loser's transaction is rolled back with a unique-key violation, which MLflow
# reports as BAD_REQUEST; run again, it finds the row and links to it.
CONFLICTS = ("duplicate key value violates unique constraint", "UNIQUE constraint failed")
RETRY_SECONDS = 60.0  # how long a transient SQL-store error is retried before it is an error
OUTAGE_ENV = "FOOD101_STORE_OUTAGE_SECONDS"
OUTAGE_SECONDS = 180.0  # default: a restart of `make server` (20-40 s here), with margin
# How a request that never reached a working server looks once MLflow's own retries are spent
# (rest_utils wraps urllib3's errors in the message): refused connections and the
# 502/503/504 answers of a proxy in front of a server that is down. Retrying those cannot
# apply a change twice. A timeout or a connection dropped mid-request is not retried: the
# server may have applied it.
UNREACHABLE = ("Connection refused", "NewConnectionError", "too many 502 error responses",
               "too many 503 error responses", "too many 504 error responses")
_answered: set[str] = set()  # server URIs that have answered in this process


# -- where the store is ------------------------------------------------------------------------


def store_dir() -> Path:
    """The project's own MLflow folder (``<root>/mlruns``)."""
    return project_root() / "mlruns"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<abs root>/mlruns/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE}{store_dir() / 'mlflow.db'}"


def sqlite_path(uri: str | None = None) -> Path | None:
    """The database file of a local SQLite store (``uri``, default: the configured one), or
    None for any other store (a server)."""
    uri = uri or tracking_uri()
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


def is_local_store(uri: str | None = None) -> bool:
    """A SQLite file on this machine (every process that uses it can share a file lock)."""
    return sqlite_path(uri) is not None


def artifact_location(uri: str | None = None) -> str | None:
    """Where a local store keeps artifacts (``mlruns/artifacts``, beside the database);
    None for a server, which decides itself."""
    db = sqlite_path(uri)
    return (db.parent / "artifacts").as_uri() if db else None


def display_uri(uri: str | None = None) -> str:
    """The store URI for messages and logs: any ``user:password@`` part removed."""
    uri = uri or tracking_uri()
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri  # as it is (urlunsplit would also drop the empty host of sqlite:////path)
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def configure() -> str:
    """Point MLflow (tracking and registry) at the store; return its URI. A missing SQLite
    store is created first, once, even when several pipelines start at the same moment."""
    uri = tracking_uri()
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        _create_sqlite_store(db)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _create_sqlite_store(db: Path) -> None:
    """Create and migrate the database under a temporary name, then rename it into place:
    concurrent processes (queued experiments on a fresh clone) never see a half-migrated
    store, and only one of them runs the migrations."""
    import fcntl

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / ".create.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if db.exists():
            return  # another process created it while this one waited
        tmp = db.with_name(f".{db.name}.creating-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        log.info("creating the MLflow store %s", db)
        store = SqlAlchemyStore(f"{SQLITE}{tmp}", (db.parent / "artifacts").as_uri())
        store.engine.dispose()
        os.replace(tmp, db)


def client() -> MlflowClient:
    """A client of the configured store (tracking and registry)."""
    uri = configure()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_store() -> str:
    """Fail early, before any work, when the store cannot be reached; returns its URI."""
    uri = configure()
    outage_seconds()  # a wrong FOOD101_STORE_OUTAGE_SECONDS stops here, before any work
    store_call("reach the store", client().search_experiments, max_results=1)
    return uri


# -- calling it --------------------------------------------------------------------------------


def error_code(exc: BaseException) -> str:
    """MLflow's error code of ``exc`` ("" for anything else)."""
    return str(getattr(exc, "error_code", ""))


def outage_seconds() -> float:
    """How long a server that has answered and then stops answering is waited for
    (``FOOD101_STORE_OUTAGE_SECONDS``, default :data:`OUTAGE_SECONDS`)."""
    raw = os.environ.get(OUTAGE_ENV, "")
    try:
        value = float(raw) if raw else OUTAGE_SECONDS
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise TrackingError(f"{OUTAGE_ENV}={raw!r}: expected a number of seconds (>= 0)")
    return value


def is_unreachable(exc: BaseException) -> bool:
    """The request never reached a working server (see :data:`UNREACHABLE`)."""
    return any(marker in str(exc) for marker in UNREACHABLE)


def store_call(what: str, fn: Callable[..., T], *args: Any, allow: tuple[str, ...] = (),
               **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` against the store, ``what`` naming the operation for people.

    MLflow errors whose code is in ``allow`` are raised as they are, for the caller to read
    (only those: any other failure is a :class:`StoreError`, never mistaken for an absence).
    Transient errors of a SQL store (busy, or a concurrent insert of the same row) are retried
    with backoff for up to :data:`RETRY_SECONDS`. A server that has answered in this process
    and is now unreachable is retried for up to :func:`outage_seconds` (a server never
    reached fails at once: a wrong URI is not an outage).
    """
    uri = tracking_uri()
    start = time.monotonic()
    deadline = start + RETRY_SECONDS
    delay = 0.25
    while True:
        try:
            result = fn(*args, **kwargs)
            _answered.add(uri)
            return result
        except (MlflowException, OSError) as exc:  # OSError: the network, the disk
            code = error_code(exc)
            if code and code in allow:
                _answered.add(uri)
                raise
            conflict = code == "BAD_REQUEST" and any(c in str(exc) for c in CONFLICTS)
            if (code in TRANSIENT or conflict) and time.monotonic() + delay < deadline:
                log.warning("MLflow store busy during %s (%s): retrying in %.1f s", what,
                            code, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if uri not in _answered or not is_unreachable(exc):
                raise _store_error(what, exc) from exc
            waited, window = time.monotonic() - start, outage_seconds()
            if waited >= window:
                raise _store_error(what, exc, waited) from exc
            log.warning("MLflow store %s unreachable during %s: waiting for it (%.0f of "
                        "%.0f s; %s sets the limit)", display_uri(uri), what, waited, window,
                        OUTAGE_ENV)
            time.sleep(min(5.0, window - waited))


def _store_error(what: str, exc: BaseException, waited: float | None = None) -> StoreError:
    detail = (str(getattr(exc, "message", "") or exc).strip().splitlines() or [""])[0][:300]
    code = error_code(exc) or type(exc).__name__
    outage = ("" if waited is None else
              f" It did not answer for {waited:.0f} s ({OUTAGE_ENV} sets how long to wait).")
    return StoreError(
        f"MLflow store {display_uri()}: {what} failed ({code}: {detail}).{outage} Check that "
        "the store is reachable (MLFLOW_TRACKING_URI) and retry; nothing after this step was "
        "done."
    )
