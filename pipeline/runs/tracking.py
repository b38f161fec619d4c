"""MLflow runs: opening and re-opening one, how it ends (FINISHED, FAILED, KILLED; runs of
killed processes reaped), what is logged to it, and its description.

One MLflow run per pipeline execution: ``train`` opens it (:func:`start_run`, from a
:class:`~pipeline.runs.spec.RunSpec`), ``evaluate`` and ``predict`` add to it
(:func:`resume_run`). Store access goes through :mod:`pipeline.runs.store`; the text people
read comes from :mod:`pipeline.runs.notes`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import psutil
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from pipeline.handoffs import CsvHandoff, RunRef
from pipeline.runs import notes
from pipeline.runs.spec import RunSpec, read_baseline
from pipeline.runs.store import (
    EXISTS,
    MISSING,
    StoreError,
    TrackingError,
    artifact_location,
    client,
    configure,
    display_uri,
    store_call,
)

log = logging.getLogger(__name__)


# -- runs: who owns them, and how they end ---------------------------------------------------

HOST_TAG, PID_TAG, STARTED_TAG = "food101.host", "food101.pid", "food101.pid_started"


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it (artifacts under ``mlruns/artifacts``) when missing."""
    configure()
    exp = store_call(f"read experiment {name!r}", mlflow.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    try:
        return store_call(f"create experiment {name!r}", mlflow.create_experiment, name,
                          artifact_location=artifact_location(), allow=(EXISTS,))
    except MlflowException:  # RESOURCE_ALREADY_EXISTS: created concurrently by another run
        return store_call(f"read experiment {name!r}", mlflow.get_experiment_by_name,
                          name).experiment_id


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
    """End the run in the store (waiting out an outage), then drop it from MLflow's active
    runs. Not ``store_call(mlflow.end_run)``: end_run takes the run off its stack before it
    calls the store, so a retry of it would end nothing."""
    try:
        store_call(f"end run {run_id} as {status}", client().set_terminated, run_id, status)
    except StoreError as exc:  # the original error matters more; the run is reaped later
        log.error("%s", exc)
    with contextlib.suppress(MlflowException, OSError):  # ended above, or reaped later
        while mlflow.active_run():
            mlflow.end_run(status)


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


RETRAIN = "dvc repro -f --downstream train"  # trains again here, and what follows it


def check_run_here(ref: RunRef) -> mlflow.entities.Run:
    """The run ``reports/run.json`` names, read from the configured store. When this store
    does not have it (results pulled with ``dvc pull`` into a clone with a store of its own,
    a deleted ``mlruns/``), a :class:`TrackingError` names the store the run is in and the
    two ways out."""
    configure()
    try:
        return store_call(f"read run {ref.run_id}", mlflow.get_run, ref.run_id,
                          allow=(MISSING,))
    except MlflowException as exc:
        here = display_uri()
        head = (f"MLflow run {ref.run_id} ({ref.run_name}), which reports/run.json names, is "
                f"not in the MLflow store {here}")
        if ref.tracking_uri == here:
            why = (f"{head}: it was trained in this store and is gone from it (mlruns/ "
                   f"deleted?). Train again here: `{RETRAIN}`.")
        else:
            there = ref.tracking_uri or "another store (reports/run.json predates recording it)"
            why = (f"{head}: the results in reports/ were made with {there} (pulled with "
                   "`dvc pull`?). Either point MLFLOW_TRACKING_URI at that store and run "
                   f"`dvc repro` again, or train here: `{RETRAIN}` (trains, evaluates and "
                   "registers in this store).")
        raise TrackingError(why) from exc


@contextlib.contextmanager
def resume_run(ref: RunRef) -> Iterator[str]:
    """Re-open the run that ``train`` started (``evaluate`` and ``predict`` add to it)."""
    run = check_run_here(ref)
    reap_killed_runs(run.info.experiment_id)
    with _owned_run(run_id=ref.run_id):
        yield ref.run_id


def active_experiment_id() -> str:
    """The experiment of the active run."""
    return mlflow.active_run().info.experiment_id


# -- what is logged ----------------------------------------------------------------------------


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


class MetricSender:
    """Metrics of a training loop, sent to run ``run_id`` by one background thread.

    The loop never waits on the store: :meth:`log` queues and returns. The thread sends what
    is queued in batches through :func:`store_call`, so a restart of the tracking server is
    waited for (up to its outage window) while training goes on; a failure is raised in the
    loop at its next :meth:`log`, or at :meth:`close`, which sends what is left.
    """

    BATCH = 1000  # MLflow's limit of metrics per log_batch request

    def __init__(self, run_id: str):
        self._run_id, self._client = run_id, client()
        self._queue: queue.Queue[list[Metric] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._send, name="mlflow-metrics",
                                        daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._raise()
        now = int(time.time() * 1000)
        self._queue.put([Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        """Send what is queued (waiting out an outage, bounded) and stop the thread."""
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _send(self) -> None:
        done = False
        while not done:
            pending = self._queue.get()
            done = pending is None
            pending = pending or []
            while not done:  # what else is queued goes in the same requests
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                done = more is None
                pending.extend(more or [])
            for i in range(0, len(pending) if self._error is None else 0, self.BATCH):
                try:
                    store_call("log metrics", self._client.log_batch, self._run_id,
                               metrics=pending[i:i + self.BATCH])
                except BaseException as exc:  # noqa: BLE001 (raised in the loop's thread)
                    self._error = exc
                    break


@contextlib.contextmanager
def metric_sender(run_id: str) -> Iterator[MetricSender]:
    """A :class:`MetricSender` for the body; what it queued is sent when the body ends."""
    sender = MetricSender(run_id)
    try:
        yield sender
    except BaseException:
        with contextlib.suppress(Exception):  # the body's error is the one to report
            sender.close()
        raise
    sender.close()


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


def log_png(png: bytes, artifact_file: str) -> None:
    """A picture already rendered (``plots.png_bytes``): the stage writes the same bytes to
    its plots/ file, so each figure is drawn once."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_bytes(png)
        store_call(f"log {artifact_file}", mlflow.log_artifact, str(path),
                   str(Path(artifact_file).parent) if "/" in artifact_file else None)


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


def run_tag(run_id: str, key: str) -> str | None:
    """One tag of a run (None when unset)."""
    run = store_call(f"read run {run_id}", client().get_run, run_id)
    return run.data.tags.get(key)


def delete_tag(run_id: str, key: str) -> None:
    """Remove a tag the run has (``run_tag`` says whether it does)."""
    store_call(f"untag run {run_id}", client().delete_tag, run_id, key)


def read_artifact_text(run_id: str, artifact_file: str) -> str | None:
    """A text artifact of a run; None when the run has no such file."""
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/{artifact_file}")
    except (MlflowException, OSError):
        return None


def download_model(model_uri: str, dst: Path) -> Path:
    """A logged model's folder, downloaded (copied, for a local store) into ``dst``."""
    configure()
    return Path(store_call(f"download {model_uri}", mlflow.artifacts.download_artifacts,
                           artifact_uri=model_uri, dst_path=str(dst)))


# -- the descriptions people read (text from notes) -------------------------------------------


def describe_experiment(exp_id: str, model_name: str) -> None:
    """Set the experiment's description and its runs-table view (experiment tags)."""
    c = client()
    exp = store_call(f"read experiment {exp_id}", c.get_experiment, exp_id)
    note = notes.experiment_note(exp.name, exp_id, model_name)
    store_call("describe the experiment", c.set_experiment_tag, exp_id, notes.NOTE, note)
    store_call("store the runs-table view", c.set_experiment_tag, exp_id, notes.VIEW_TAG,
               json.dumps(notes.runs_view_state()))


def describe_run(spec: RunSpec, facts: dict[str, object]) -> None:
    """Set the active run's description: what ``spec`` changed from the committed baseline,
    then ``facts`` (data, resolved values)."""
    base = spec.baseline or read_baseline(spec.params)
    text = notes.run_note(base.changes, base.commit, base.dirty, facts,
                          os.environ.get("DVC_EXP_NAME"))
    store_call("describe the run", mlflow.set_tag, notes.NOTE, text)


def set_run_note_section(heading: str, text: str) -> None:
    """Add the section ``### <heading>`` to the active run's description, or replace it when
    the stage runs again."""
    run = mlflow.active_run()
    note = (store_call("read the run's description", mlflow.get_run, run.info.run_id)
            .data.tags.get(notes.NOTE, "") if run else "")
    store_call("describe the run", mlflow.set_tag, notes.NOTE,
               notes.with_section(note, heading, text))


def runs_page(experiment: str) -> str | None:
    """The route of ``experiment``'s runs table (in the stored view when the experiment has
    it), or None when the store has no such experiment yet."""
    configure()
    exp = store_call(f"read experiment {experiment!r}", mlflow.get_experiment_by_name,
                     experiment)
    if exp is None:
        return None
    return notes.runs_route(exp.experiment_id, view=notes.VIEW_TAG in exp.tags)
