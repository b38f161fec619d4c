"""MLflow tracking, as run plumbing: the store, runs, params, metrics, datasets and artifacts.

One of the three modules that import MLflow (with ``registry`` and the model's own
``pipeline.model.pyfunc``). The store is SQLite under the project's own ``mlruns/`` at an
absolute path, also inside ``dvc exp run --temp``; ``MLFLOW_TRACKING_URI`` overrides it (a
team server).

Errors are errors: every store call goes through :func:`store_call`, which retries transient
failures (a busy SQLite database) for a bounded time and turns any other store failure into
a :class:`StoreError` naming the store and the operation. Only the codes a caller asks for
(``RESOURCE_DOES_NOT_EXIST``...) reach it as MLflow's own exception. HTTP stores retry in
MLflow itself (``MLFLOW_HTTP_REQUEST_*``, given bounded defaults here; a user's values win).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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

import mlflow  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.config import ConfigError, Params, params_from_dict  # noqa: E402
from pipeline.errors import PipelineError  # noqa: E402
from pipeline.handoffs import CsvHandoff  # noqa: E402
from pipeline.paths import project_root  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


class TrackingError(PipelineError):
    """The MLflow store or run is not where the pipeline expects it."""


class StoreError(TrackingError):
    """The MLflow store failed an operation (unreachable, refused, broken)."""


T = TypeVar("T")
MISSING = "RESOURCE_DOES_NOT_EXIST"
EXISTS = "RESOURCE_ALREADY_EXISTS"
TRANSIENT = ("TEMPORARILY_UNAVAILABLE",)  # what MLflow's SQL store makes of a busy database
RETRY_SECONDS = 60.0  # how long a transient SQL-store error is retried before it is an error


def error_code(exc: BaseException) -> str:
    """MLflow's error code of ``exc`` ("" for anything else)."""
    return str(getattr(exc, "error_code", ""))


def store_call(what: str, fn: Callable[..., T], *args: Any, allow: tuple[str, ...] = (),
               **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` against the store, ``what`` naming the operation for people.

    MLflow errors whose code is in ``allow`` are raised as they are, for the caller to read
    (only those: any other failure is a :class:`StoreError`, never mistaken for an absence).
    Transient errors of a SQL store are retried with backoff for up to :data:`RETRY_SECONDS`.
    """
    deadline = time.monotonic() + RETRY_SECONDS
    delay = 0.25
    while True:
        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            code = error_code(exc)
            if code in allow:
                raise
            if code in TRANSIENT and time.monotonic() + delay < deadline:
                log.warning("MLflow store busy during %s (%s): retrying in %.1f s", what,
                            code, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            raise _store_error(what, exc) from exc
        except OSError as exc:  # the network, the disk
            raise _store_error(what, exc) from exc


def _store_error(what: str, exc: BaseException) -> StoreError:
    detail = (str(getattr(exc, "message", "") or exc).strip().splitlines() or [""])[0][:300]
    code = error_code(exc) or type(exc).__name__
    return StoreError(
        f"MLflow store {tracking_uri()}: {what} failed ({code}: {detail}). Check that the "
        "store is reachable (MLFLOW_TRACKING_URI) and retry; nothing after this step was done."
    )


def client() -> MlflowClient:
    """A client of the configured store (tracking and registry)."""
    uri = configure()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_store() -> str:
    """Fail early, before any work, when the store cannot be reached; returns its URI."""
    uri = configure()
    store_call("reach the store", client().search_experiments, max_results=1)
    return uri


def store_dir() -> Path:
    """The project's own MLflow folder (``<root>/mlruns``)."""
    return project_root() / "mlruns"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<abs root>/mlruns/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{store_dir() / 'mlflow.db'}"


def configure() -> str:
    """Point MLflow (tracking and registry) at the store; return its URI. A missing SQLite
    store is created first, once, even when several pipelines start at the same moment."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.exists():
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
        store = SqlAlchemyStore(f"sqlite:///{tmp}", (db.parent / "artifacts").as_uri())
        store.engine.dispose()
        os.replace(tmp, db)


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it (artifacts under ``mlruns/artifacts``) when missing."""
    configure()
    exp = store_call(f"read experiment {name!r}", mlflow.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:///"):
        location = (Path(tracking_uri().removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    try:
        return store_call(f"create experiment {name!r}", mlflow.create_experiment, name,
                          artifact_location=location, allow=(EXISTS,))
    except MlflowException:  # RESOURCE_ALREADY_EXISTS: created concurrently by another run
        return store_call(f"read experiment {name!r}", mlflow.get_experiment_by_name,
                          name).experiment_id


# -- what a new run is called and tagged with --------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_tags() -> dict[str, str]:
    """Commit and dirty flag of the working tree (inside a DVC experiment: its baseline)."""
    commit = _git("rev-parse", "HEAD") or "unknown"
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        "git_commit": commit,
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        "mlflow.source.git.commit": commit,
    }
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get("DVC_EXP_BASELINE_REV"):
        tags["dvc_exp_baseline_rev"] = os.environ["DVC_EXP_BASELINE_REV"]
    return tags


def committed_params() -> dict | None:
    """The flat params of params.yaml at git HEAD (the run name says what differs from it)."""
    text = _git("show", "HEAD:params.yaml")
    try:
        return params_from_dict(yaml.safe_load(text)).flat() if text else None
    except (yaml.YAMLError, ConfigError):
        return None


def describe_changes(current: dict, baseline: dict | None) -> str:
    """``lr=0.001 epochs=3``: the params that differ from the committed params.yaml."""
    if not baseline:
        return ""
    changed = [k for k in sorted(current) if k in baseline and current[k] != baseline[k]]
    changed += [k for k in sorted(current) if k not in baseline]
    short = {}
    for key in changed:
        leaf = key.split(".")[-1]
        clash = sum(1 for k in current if k.split(".")[-1] == leaf) > 1
        short[key if clash else leaf] = current[key]
    return " ".join(f"{k}={v}" for k, v in short.items())


def run_name(changes: str) -> str:
    """``<dvc exp name>: <changes>``, or ``baseline``."""
    prefix = os.environ.get("DVC_EXP_NAME", "")
    text = changes or "baseline"
    return f"{prefix}: {text}" if prefix else text


@dataclass(frozen=True)
class RunSpec:
    """What a new pipeline run is: experiment, name, tags and every (flattened) param."""

    experiment: str
    name: str
    tags: dict[str, str]
    params: dict


def run_spec(params: Params, stage: str = "train") -> RunSpec:
    """The run of this pipeline execution: named after what differs from the committed
    params, tagged with git state, DVC experiment and the params hash."""
    flat = params.flat()
    tags = {**git_tags(), "params_hash": params.digest(), "stage": stage}
    return RunSpec(params.mlflow.experiment, run_name(describe_changes(flat, committed_params())),
                   tags, flat)


# -- runs --------------------------------------------------------------------------------------


# -- runs: who owns them, and how they end --------------------------------------------------

HOST_TAG, PID_TAG, STARTED_TAG = "food101.host", "food101.pid", "food101.pid_started"


def process_tags() -> dict[str, str]:
    """What identifies the process that owns a run (to reap it if that process is killed)."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()),
            STARTED_TAG: f"{psutil.Process().create_time():.3f}"}


def _alive(pid: int, started: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.Error, ValueError):
        return False


def reap_killed_runs(experiment_id: str) -> list[str]:
    """End as KILLED the runs of this experiment left RUNNING by a process of this machine
    that no longer exists (SIGKILL, the OOM killer, a closed laptop); returns their ids.

    Runs of other machines, and runs whose process is alive, are left alone.
    """
    c = client()
    host = socket.gethostname()
    runs = store_call(
        "look for runs left RUNNING", c.search_runs, [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    reaped = []
    for run in runs:
        tags = run.data.tags
        try:
            pid, started = int(tags[PID_TAG]), float(tags[STARTED_TAG])
        except (KeyError, ValueError):
            continue  # not started by this pipeline: not ours to judge
        if _alive(pid, started):
            continue
        store_call(f"end killed run {run.info.run_id}", c.set_terminated, run.info.run_id,
                   "KILLED")
        store_call(f"tag killed run {run.info.run_id}", c.set_tag, run.info.run_id,
                   "food101.reaped", f"process {pid} on {host} was gone")
        log.warning("MLflow run %s (%s) was left RUNNING by process %d, which is gone: "
                    "ended as KILLED", run.info.run_id, run.info.run_name, pid)
        reaped.append(run.info.run_id)
    return reaped


@contextlib.contextmanager
def _owned_run(**start_kwargs: Any) -> Iterator[str]:
    """An active MLflow run that ends FINISHED, FAILED on an error, KILLED on SIGTERM/Ctrl-C."""
    run = store_call("start the run", mlflow.start_run, **start_kwargs)
    run_id = run.info.run_id
    try:
        store_call("tag the run with its process", mlflow.set_tags, process_tags())
        yield run_id
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (pipeline.signals.Terminated)
        _end(run_id, "KILLED")
        raise
    except BaseException:
        _end(run_id, "FAILED")
        raise
    _end(run_id, "FINISHED")


def _end(run_id: str, status: str) -> None:
    try:
        store_call(f"end run {run_id} as {status}", mlflow.end_run, status)
    except StoreError as exc:  # the original error matters more; the run is reaped later
        log.error("%s", exc)
        while mlflow.active_run():
            mlflow.end_run(status)  # drop it from the local stack anyway


@contextlib.contextmanager
def start_run(spec: RunSpec) -> Iterator[str]:
    """Open a new run; yields its id. Every param is logged; runs this machine's killed
    processes left RUNNING are reaped first."""
    exp_id = ensure_experiment(spec.experiment)
    reap_killed_runs(exp_id)
    with _owned_run(experiment_id=exp_id, run_name=spec.name, tags=spec.tags) as run_id:
        log.info("MLflow run %s (%s) in %s", run_id, spec.name, tracking_uri())
        log_params(spec.params)
        yield run_id


@contextlib.contextmanager
def resume_run(run_id: str) -> Iterator[str]:
    """Re-open the run that ``train`` started (``evaluate`` and ``predict`` add to it)."""
    configure()
    try:
        run = store_call(f"read run {run_id}", mlflow.get_run, run_id, allow=(MISSING,))
    except MlflowException as exc:
        raise TrackingError(
            f"MLflow run {run_id} (from reports/run.json) is not in {tracking_uri()}: was "
            "mlruns/ deleted or MLFLOW_TRACKING_URI changed? Re-run `dvc repro -f train`."
        ) from exc
    reap_killed_runs(run.info.experiment_id)
    with _owned_run(run_id=run_id):
        yield run_id


def log_params(params: dict) -> None:
    """Log a flat ``key -> value`` dict (lists as JSON, None as 'null')."""
    clean = {
        k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else ("null" if v is None else v)
        for k, v in params.items()
    }
    store_call("log params", mlflow.log_params, clean)


def log_metrics(metrics: dict, step: int | None = None, run_id: str | None = None) -> None:
    """To the active run, or to ``run_id`` (a DDP worker logs to its launcher's run)."""
    store_call("log metrics", mlflow.log_metrics, {k: float(v) for k, v in metrics.items()},
               step=step, run_id=run_id)


def log_metric(key: str, value: float, step: int | None = None, run_id: str | None = None
               ) -> None:
    store_call(f"log metric {key}", mlflow.log_metric, key, float(value), step=step,
               run_id=run_id)


def set_tags(tags: dict) -> None:
    store_call("set tags", mlflow.set_tags, {k: str(v) for k, v in tags.items()})


def log_manifest(manifest: CsvHandoff, name: str, context: str) -> str:
    """Log a manifest as an MLflow dataset input (its file's sha256 as a tag); returns it."""
    dataset = mlflow.data.from_pandas(manifest.frame, source=manifest.path, name=name,
                                      targets="label")
    store_call(f"log dataset {name}", mlflow.log_input, dataset, context=context,
               tags={"sha256": manifest.sha256})
    store_call("set a tag", mlflow.set_tag, f"data.{name}_sha256", manifest.sha256)
    return manifest.sha256


def log_dict(data: dict, artifact_file: str) -> None:
    store_call(f"log {artifact_file}", mlflow.log_dict, data, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    store_call(f"log {artifact_file}", mlflow.log_text, text, artifact_file)


def log_figure(fig: Figure, artifact_file: str, dpi: int) -> None:
    store_call(f"log {artifact_file}", mlflow.log_figure, fig, artifact_file,
               save_kwargs={"dpi": dpi})


def log_to_run(run_id: str, metrics: dict, tags: dict, texts: dict[str, str]) -> None:
    """Add metrics, tags and text artifacts to another (usually finished) run, without
    re-opening it: its status and end time stay as they are."""
    c = client()
    for key, value in metrics.items():
        store_call(f"log {key} to run {run_id}", c.log_metric, run_id, key, float(value))
    for key, value in tags.items():
        store_call(f"tag run {run_id}", c.set_tag, run_id, key, str(value))
    for artifact_file, text in texts.items():
        store_call(f"log {artifact_file} to run {run_id}", c.log_text, run_id, text,
                   artifact_file)


def download_model(model_uri: str, dst: Path) -> Path:
    """A logged model's folder, downloaded (copied, for a local store) into ``dst``."""
    configure()
    return Path(store_call(f"download {model_uri}", mlflow.artifacts.download_artifacts,
                           artifact_uri=model_uri, dst_path=str(dst)))
