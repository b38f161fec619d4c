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
from urllib.parse import quote

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
# Two pipelines inserting the same row at once (the same manifest logged as a dataset by two
# clones): the loser's transaction is rolled back with a unique-key violation, which MLflow
# reports as BAD_REQUEST; run again, it finds the row and links to it.
CONFLICTS = ("duplicate key value violates unique constraint", "UNIQUE constraint failed")
RETRY_SECONDS = 60.0  # how long a transient SQL-store error is retried before it is an error


def error_code(exc: BaseException) -> str:
    """MLflow's error code of ``exc`` ("" for anything else)."""
    return str(getattr(exc, "error_code", ""))


def store_call(what: str, fn: Callable[..., T], *args: Any, allow: tuple[str, ...] = (),
               **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` against the store, ``what`` naming the operation for people.

    MLflow errors whose code is in ``allow`` are raised as they are, for the caller to read
    (only those: any other failure is a :class:`StoreError`, never mistaken for an absence).
    Transient errors of a SQL store (busy, or a concurrent insert of the same row) are retried
    with backoff for up to :data:`RETRY_SECONDS`.
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
            conflict = code == "BAD_REQUEST" and any(c in str(exc) for c in CONFLICTS)
            if (code in TRANSIENT or conflict) and time.monotonic() + delay < deadline:
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
        f"MLflow store {display_uri()}: {what} failed ({code}: {detail}). Check that the "
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


def display_uri(uri: str | None = None) -> str:
    """The store URI for messages and logs: any ``user:password@`` part removed."""
    from urllib.parse import urlsplit, urlunsplit

    uri = uri or tracking_uri()
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri  # as it is (urlunsplit would also drop the empty host of sqlite:////path)
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def is_local_store(uri: str | None = None) -> bool:
    """A SQLite file on this machine (every process that uses it can share a file lock)."""
    return (uri or tracking_uri()).startswith("sqlite:///")


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
        log.info("MLflow run %s (%s) in %s", run_id, spec.name, display_uri())
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
            f"MLflow run {run_id} (from reports/run.json) is not in {display_uri()}: was "
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


# -- the UI: links into it, the runs-table view they open, and the descriptions people read ---

# MLflow's own description field of experiments and runs (markdown, shown by the UI).
NOTE = "mlflow.note.content"
# MLflow 3's UI opens in its GenAI mode (traces) unless the URL asks for model training.
UI_MODE = "workflowType=machine_learning"
# A runs-table view stored in the experiment (the UI's own "shared view", an experiment tag):
# the test metrics as the first columns, best first, instead of datasets and sources that
# push every metric off screen.
RUNS_VIEW = "model-training"
VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"
VIEW_METRICS = ("test_accuracy", "test_top5_accuracy", "test_macro_f1", "val_accuracy")
PICTURES = ("training/learning_curves.png", "evaluation/confusion_matrix.png",
            "evaluation/per_class_accuracy.png", "evaluation/worst_predictions.png")


def ui_route(route: str) -> str:
    """``#/<route>?workflowType=machine_learning``: a page of the MLflow UI in model-training
    mode, relative to the server's address (so links in descriptions work on any host)."""
    sep = "&" if "?" in route else "?"
    return f"#/{route.lstrip('/')}{sep}{UI_MODE}"


def runs_route(exp_id: str, view: bool = True) -> str:
    """The experiment's runs table; ``view``: in the stored view (see :data:`RUNS_VIEW`)."""
    route = ui_route(f"experiments/{exp_id}/runs")
    return f"{route}&viewStateShareKey={RUNS_VIEW}" if view else route


def run_route(exp_id: str, run_id: str) -> str:
    return ui_route(f"experiments/{exp_id}/runs/{run_id}")


def model_route(model_name: str) -> str:
    return ui_route(f"models/{quote(model_name, safe='')}")


def version_route(model_name: str, version: str) -> str:
    return ui_route(f"models/{quote(model_name, safe='')}/versions/{version}")


def compare_route(exp_id: str, run_ids: list[str]) -> str:
    return ui_route(f"compare-runs?runs={quote(json.dumps(run_ids))}"
                    f"&experiments={quote(json.dumps([exp_id]))}")


def runs_page(experiment: str) -> str | None:
    """The route of ``experiment``'s runs table (in the stored view when the experiment has
    it), or None when the store has no such experiment yet."""
    configure()
    exp = store_call(f"read experiment {experiment!r}", mlflow.get_experiment_by_name,
                     experiment)
    if exp is None:
        return None
    return runs_route(exp.experiment_id, view=VIEW_TAG in exp.tags)


def runs_view_state() -> dict:
    """The stored runs-table view: sorted by test accuracy, the test metrics first."""
    metrics = [f"metrics.`{m}`" for m in VIEW_METRICS]
    return {"orderByKey": metrics[0], "orderByAsc": False, "selectedColumns": metrics}


def experiment_note(experiment: str, exp_id: str, model_name: str) -> str:
    """The experiment's description: what it is, how to compare runs, where the champion is."""
    pictures = ", ".join(f"`{p}`" for p in PICTURES)
    return (
        f"**{experiment}**: transfer learning of a torchvision ResNet50 on Food-101-style "
        "photos, one run per execution of the DVC pipeline (prepare → sample → split → train "
        "→ evaluate → predict). Each run is named after what differs from the committed "
        "`params.yaml` (`baseline` when nothing does); its description says what differs "
        "and the registry's decision.\n\n"
        f"**Compare runs:** the view [{RUNS_VIEW}]({runs_route(exp_id)}) sorts the table "
        "by `test_accuracy` with the test metrics first; tick two or more runs and press "
        "*Compare* for params, metrics and per-epoch curves side by side. Each run's "
        f"artifacts hold the pictures {pictures}, and the logged model.\n\n"
        f"**Champion:** the registered model [{model_name}]({model_route(model_name)}), "
        f"alias `champion` (load `models:/{model_name}@champion`). Every evaluated run "
        "becomes a version with alias `challenger`; it is promoted when it beats the "
        "champion's test accuracy on the same test manifest. `python -m pipeline versions` "
        "lists them."
    )


def describe_experiment(exp_id: str, model_name: str) -> None:
    """Set the experiment's description and its runs-table view (experiment tags)."""
    c = client()
    exp = store_call(f"read experiment {exp_id}", c.get_experiment, exp_id)
    note = experiment_note(exp.name, exp_id, model_name)
    store_call("describe the experiment", c.set_experiment_tag, exp_id, NOTE, note)
    store_call("store the runs-table view", c.set_experiment_tag, exp_id, VIEW_TAG,
               json.dumps(runs_view_state()))


def active_experiment_id() -> str:
    """The experiment of the active run."""
    return mlflow.active_run().info.experiment_id


def baseline_diff(current: dict, baseline: dict | None) -> list[tuple[str, object, object]]:
    """``(key, committed value, this run's value)`` for every param that differs from the
    committed params.yaml (a key the baseline lacks has ``None`` there)."""
    if baseline is None:
        return []
    return [(k, baseline.get(k), current[k]) for k in sorted(current)
            if k not in baseline or baseline[k] != current[k]]


def run_note(current: dict, baseline: dict | None, facts: dict[str, object]) -> str:
    """A run's description (markdown): what differs from the committed baseline, then
    ``facts`` (data, resolved values) as a list."""
    git = git_tags()
    if git["git_commit"] == "unknown":
        where = "the committed `params.yaml` (no git repository here)"
    else:
        dirty = ", with uncommitted changes" if git["git_dirty"] == "true" else ""
        where = f"`params.yaml` at git commit `{git['git_commit'][:10]}`{dirty}"
    if baseline is None:
        head = f"**What differs from the baseline:** unknown: {where} could not be read."
    elif diff := baseline_diff(current, baseline):
        rows = "\n".join(f"| `{k}` | {_cell(old)} | **{_cell(new)}** |" for k, old, new in diff)
        head = (f"**What differs from the committed baseline** ({where}):\n\n"
                f"| param | baseline | this run |\n| --- | --- | --- |\n{rows}")
    else:
        head = f"**The committed baseline:** no param differs from {where}."
    if os.environ.get("DVC_EXP_NAME"):
        head += f"\n\nDVC experiment `{os.environ['DVC_EXP_NAME']}`."
    lines = "\n".join(f"- {k}: {v}" for k, v in facts.items())
    return f"{head}\n\n{lines}" if facts else head


def _cell(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text.replace("|", "\\|")


def set_run_note(text: str) -> None:
    """Set the active run's description."""
    store_call("describe the run", mlflow.set_tag, NOTE, text)


def set_run_note_section(heading: str, text: str) -> None:
    """Add the section ``### <heading>`` to the active run's description, or replace it when
    the stage runs again."""
    run = mlflow.active_run()
    note = (store_call("read the run's description", mlflow.get_run, run.info.run_id)
            .data.tags.get(NOTE, "") if run else "")
    head, *sections = note.split("\n\n### ")
    sections = [s for s in sections if not s.startswith(f"{heading}\n")]
    store_call("describe the run", mlflow.set_tag, NOTE,
               "\n\n### ".join([head, *sections, f"{heading}\n{text}"]))
